"""merge against PEFT's own merge_and_unload(), bit for bit (tests/fixtures/peft_merge).

The fixtures were written by real PEFT 0.21 on torch 2.13 (CPU) with
tests/fixtures/make_merge_fixtures.py.  float32 is promised bit for bit; for
float64 torch's MKL path leaves a few columns unfused, so float64 is held to
the one-rounding bound instead.
"""

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import reference as ref
from numba_lora import LoraLinear, kernels

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "peft_merge"
CASES = sorted(p.stem for p in FIXTURES.glob("*.safetensors"))


def _load(name):
    t = load_file(str(FIXTURES / f"{name}.safetensors"))
    return t["W"], t["A"], t["B"], float(t["scaling"][0]), int(t["rank"][0]), \
        bool(t["use_rslora"][0]), float(t["alpha"][0])


def test_fixtures_are_there():
    assert len(CASES) >= 10


@pytest.mark.parametrize("name", CASES)
def test_kernel_merge_matches_peft(name):
    W, A, B, scaling, _, _, _ = _load(name)
    expected = load_file(str(FIXTURES / f"{name}.safetensors"))["merged"]
    merged = W.copy()
    kernels.merge(merged, A, B, scaling)
    if W.dtype == np.float32:
        ref.assert_bitwise_equal(merged, expected)
    else:
        # Within one rounding of the delta and one of the sum.
        exact, magnitude = ref.merged(W, A, B, scaling)
        ref.assert_close(merged, exact, magnitude, W.dtype)


@pytest.mark.parametrize("name", [c for c in CASES if c.startswith("f32")])
def test_layer_merge_matches_peft(name):
    W, A, B, scaling, rank, rslora, alpha = _load(name)
    expected = load_file(str(FIXTURES / f"{name}.safetensors"))["merged"]
    layer = LoraLinear(W, rank, alpha, use_rslora=rslora)
    assert layer.scaling == scaling
    layer.lora_a, layer.lora_b = A, B
    layer.merge(check_finite=True)
    ref.assert_bitwise_equal(layer.weight, expected)
    layer.unmerge()
    layer.merge()
    # A cycle reproduces the merged values; only the sign of a zero may
    # differ (-0 - -0 is +0, so an unmerge turns W = -0 into +0).
    np.testing.assert_array_equal(layer.weight, expected)
