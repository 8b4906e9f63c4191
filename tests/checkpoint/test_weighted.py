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
