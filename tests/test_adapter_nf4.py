"""LoraAdapter over an NF4 base: from_peft(..., quantize="nf4") and add_layer(quantize="nf4")."""

from pathlib import Path

import numpy as np
import pytest

from numba_lora import (LoraAdapter, LoraConfig, LoraConfigError, LoraUnsupportedError,
                        QLoraLinear, nf4)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
BASE = FIXTURES / "base_model.safetensors"


def test_from_peft_quantizes_every_base_weight(tmp_path):
    plain = LoraAdapter.from_peft(FIXTURES / "peft_lora", BASE)
    quant = LoraAdapter.from_peft(FIXTURES / "peft_lora", BASE, quantize="nf4")
    assert quant.layer_names == plain.layer_names
    rng = np.random.default_rng(0)
    for name, layer in quant.items():
        ref = plain[name]
        assert isinstance(layer, QLoraLinear)
        assert (layer.rank, layer.alpha, layer.scaling) == (ref.rank, ref.alpha, ref.scaling)
        np.testing.assert_array_equal(layer.lora_a, ref.lora_a.astype(np.float32))
        np.testing.assert_array_equal(layer.lora_b, ref.lora_b.astype(np.float32))
        # The base is bitsandbytes' NF4 of the same weight; the forward is
        # dequantize(W) x + s B (A x) to float32 accuracy.
        expected_q = nf4.quantize(np.asarray(ref.weight, np.float32))
        assert layer.quantized == expected_q
        X = rng.standard_normal((3, layer.in_features)).astype(np.float32)
        Wd = nf4.dequantize(layer.quantized).astype(np.float64)
        A, B = (np.asarray(m, np.float64) for m in (layer.lora_a, layer.lora_b))
        want = X @ Wd.T + layer.scaling * (X @ A.T) @ B.T
        got = layer.forward_batch(X)
        assert np.max(np.abs(got - want)) <= 1e-5 * max(1.0, np.max(np.abs(want)))
    # The factors round-trip through PEFT's files unchanged.
    quant.save_peft(tmp_path / "out")
    again = LoraAdapter.from_peft(tmp_path / "out", BASE)
    for name, layer in quant.items():
        np.testing.assert_array_equal(again[name].lora_a, layer.lora_a)
        np.testing.assert_array_equal(again[name].lora_b, layer.lora_b)


def test_merge_all_over_nf4_refuses_and_changes_nothing():
    quant = LoraAdapter.from_peft(FIXTURES / "peft_lora", BASE, quantize="nf4")
    before = {name: (layer.quantized, np.array(layer.lora_b)) for name, layer in quant.items()}
    with pytest.raises(LoraUnsupportedError, match="to_lora_linear"):
        quant.merge_all()
    for name, layer in quant.items():
        assert layer.quantized == before[name][0] and not layer.is_merged
        np.testing.assert_array_equal(layer.lora_b, before[name][1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(quantize="int8"), "quantize must be None or 'nf4'"),
    (dict(quantize="nf4", init="pissa"), "init='pissa' cannot be combined"),
])
def test_add_layer_refuses_bad_quantize(kwargs, match):
    adapter = LoraAdapter(LoraConfig(r=2, lora_alpha=4))
    with pytest.raises(LoraConfigError, match=match):
        adapter.add_layer("fc", np.ones((8, 8), np.float32), **kwargs)
    assert len(adapter) == 0


def test_from_peft_refuses_bad_quantize_before_reading():
    with pytest.raises(LoraConfigError, match="quantize"):
        LoraAdapter.from_peft(FIXTURES / "no-such-adapter", BASE, quantize="fp4")


@pytest.mark.parametrize("check_finite", [False, True])
def test_merge_all_with_an_nf4_layer_merges_nothing(check_finite):
    adapter = LoraAdapter(LoraConfig(r=2, lora_alpha=4))
    plain = adapter.add_layer("a", np.eye(8, dtype=np.float32))
    adapter.add_layer("b", np.eye(8, dtype=np.float32), quantize="nf4")
    plain.lora_b = np.ones((8, 2))
    before = np.array(plain.weight)
    with pytest.raises(LoraUnsupportedError, match="to_lora_linear"):
        adapter.merge_all(check_finite=check_finite)
    assert not plain.is_merged
    np.testing.assert_array_equal(plain.weight, before)
