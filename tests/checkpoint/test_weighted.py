"""Weighted merges of several adapters against PEFT's add_weighted_adapter + merge_and_unload.

The fixture (tests/fixtures/peft_weighted, made by make_fixtures.py there with
torch 2.13, transformers and PEFT 0.21) holds two small PEFT adapters beside
the rsLoRA/pattern adapter of tests/fixtures/peft_checkpoint, and the SHA-256
of every tensor of the tiny Llama (float32 and bfloat16) after PEFT combined
the adapters ("cat", "linear", one adapter) and merged the combination.
"""

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from numba_lora import LoraConfigError, LoraTypeError, checkpoint

from .helpers import FIXTURES as CHECKPOINTS, as_array, checkpoint_tensors

HERE = Path(__file__).resolve().parents[1] / "fixtures" / "peft_weighted"
EXPECTED = json.loads((HERE / "expected.json").read_text())["cases"]


def _adapter(name):
    return CHECKPOINTS / "llama_adapter" if name == "a" else HERE / f"adapter_{name}"


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_weighted_merge_is_peft_bit_for_bit(tmp_path, case):
    spec = EXPECTED[case]
    result = checkpoint.merge(CHECKPOINTS / spec["base"], [_adapter(n) for n in spec["adapters"]],
                              tmp_path / "out", weights=spec["weights"],
                              combination=spec["combination"])
    assert sorted(result.merged) == spec["changed"]
    ours = checkpoint_tensors(result.out)
    assert sorted(ours) == sorted(spec["sha256"])
    differ = [name for name, digest in spec["sha256"].items()
              if hashlib.sha256(ours[name][2]).hexdigest() != digest]
    assert not differ, f"{case}: {len(differ)} tensors differ from PEFT's: {differ}"


def test_cat_is_the_weighted_sum_of_the_deltas(tmp_path):
    # float32 base: the combined delta is sum_i w_i * s_i * B_i @ A_i, up to rounding.
    base = CHECKPOINTS / "llama_f32"
    adapters = [HERE / "adapter_c", HERE / "adapter_d"]
    weights = [0.5, -2.0]
    merged = checkpoint_tensors(checkpoint.merge(base, adapters, tmp_path / "cat",
                                                 weights=weights).out)
    alone = [checkpoint_tensors(checkpoint.merge(base, a, tmp_path / f"one{k}").out)
             for k, a in enumerate(adapters)]
    original = checkpoint_tensors(base)
    # c, the first adapter, is plain LoRA: the combination's scaling is r / r = 1.
    for name in original:
        W = as_array(original[name]).astype(np.float64)
        expected = W + sum(w * (as_array(one[name]).astype(np.float64) - W)
                           for w, one in zip(weights, alone))
        np.testing.assert_allclose(as_array(merged[name]), expected, rtol=1e-5, atol=1e-6,
                                   err_msg=name)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(weights=[1.0]), LoraConfigError, "weights has 1 number"),
    (dict(weights=None), LoraConfigError, "needs weights"),
    (dict(weights=[1.0, "2"]), LoraTypeError, "weights\\[1\\] must be a real number"),
    (dict(weights=[1.0, True]), LoraTypeError, "weights\\[1\\] must be a real number"),
    (dict(weights=[1.0, math.nan]), LoraConfigError, "weights\\[1\\] must be finite"),
    (dict(weights=[1.0, 1e39]), LoraConfigError, "weights\\[1\\] must be finite in float32"),
    (dict(weights=[1e38, 1.0]), LoraConfigError, "weights\\[0\\] times its scaling, .* is not "
     "finite in float32"),
    (dict(weights="12"), LoraTypeError, "weights must be a list"),
    (dict(weights=[1.0, 1.0], combination="svd"), LoraConfigError, "combination must be one of"),
    (dict(weights=[1.0, 1.0], combination="linear"), LoraConfigError,
     "'linear' needs adapters of one rank"),
])
def test_weighted_merges_refuse_bad_options(tmp_path, kwargs, error, match):
    adapters = [CHECKPOINTS / "llama_adapter", HERE / "adapter_c"]
    with pytest.raises(error, match=match):
        checkpoint.merge(CHECKPOINTS / "llama_f32", adapters, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_weights_need_a_list_of_adapters(tmp_path):
    with pytest.raises(LoraConfigError, match="give adapter as a list"):
        checkpoint.merge(CHECKPOINTS / "llama_f32", HERE / "adapter_c", tmp_path / "out",
                         weights=[1.0])
    with pytest.raises(LoraConfigError, match="empty list"):
        checkpoint.merge(CHECKPOINTS / "llama_f32", [], tmp_path / "out", weights=[])
    with pytest.raises(LoraConfigError, match="given twice"):
        checkpoint.merge(CHECKPOINTS / "llama_f32", [HERE / "adapter_c", HERE / "adapter_c"],
                         tmp_path / "out", weights=[1.0, 1.0])
    with pytest.raises(LoraConfigError, match="adapter's own directory"):
        checkpoint.merge(CHECKPOINTS / "llama_f32", [HERE / "adapter_c", HERE / "adapter_d"],
                         HERE / "adapter_d", weights=[1.0, 1.0])
    assert not (tmp_path / "out").exists()


class _Factors:
    """Stands in for a SafetensorsFile: read_many over a dict."""

    def __init__(self, path, tensors):
        self.path, self._tensors = path, tensors

    def read_many(self, keys):
        return {key: self._tensors[key] for key in keys}


@settings(max_examples=60, deadline=None)
@given(data=st.data(), combination=st.sampled_from(["cat", "linear"]),
       n=st.integers(1, 3), rows=st.integers(1, 6), cols=st.integers(1, 6))
def test_combinations_against_a_float64_reference(data, combination, n, rows, cols):
    from numba_lora.checkpoint import FactorSource, TensorMerge
    from numba_lora.checkpoint._write import _combine

    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    same = data.draw(st.integers(1, 4))
    ranks = [same] * n if combination == "linear" else \
        data.draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    weights = data.draw(st.lists(st.floats(-3, 3), min_size=n, max_size=n))
    scalings = data.draw(st.lists(st.floats(0.01, 8), min_size=n, max_size=n))
    files, sources, factors = {}, [], []
    for k, (rank, w, s) in enumerate(zip(ranks, weights, scalings)):
        A = rng.standard_normal((rank, cols)).astype(np.float32)
        B = rng.standard_normal((rows, rank)).astype(np.float32)
        files[f"f{k}"] = _Factors(f"f{k}", {"a": A, "b": B})
        sources.append(FactorSource(f"f{k}", "a", "b", rank, s, w))
        factors.append((A.astype(np.float64), B.astype(np.float64)))
    total = sum(ranks) + data.draw(st.integers(0, 3))  # "cat" pads with zero rows up to r
    merge = TensorMerge("t", "s", "m", tuple(sources),
                        total if combination == "cat" else same, 1.0, False, combination)
    A, B = _combine(files, merge, np.float32)
    assert A.dtype == B.dtype == np.float32
    if combination == "cat":
        assert A.shape == (total, cols) and B.shape == (rows, total)
        assert not A[sum(ranks):].any() and not B[:, sum(ranks):].any()
        expected = sum(w * s * (b @ a) for (a, b), w, s in zip(factors, weights, scalings))
        got = B.astype(np.float64) @ A.astype(np.float64)
        scale = sum(abs(w * s) * (np.abs(b) @ np.abs(a))
                    for (a, b), w, s in zip(factors, weights, scalings))
        assert np.all(np.abs(got - expected) <= 1e-5 * scale + 1e-30)
    else:
        roots = [np.sqrt(abs(w * s)) for w, s in zip(weights, scalings)]
        wa = [np.float32(r if w * s >= 0 else -r) for r, w, s in zip(roots, weights, scalings)]
        wb = [np.float32(r) for r in roots]
        np.testing.assert_allclose(A, sum(float(x) * a for x, (a, _) in zip(wa, factors)),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(B, sum(float(x) * b for x, (_, b) in zip(wb, factors)),
                                   rtol=1e-5, atol=1e-5)
