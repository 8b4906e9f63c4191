"""kernels.convert: half-precision merges and the exact conversions, against NumPy references.

merge_bf16 / merge_f16 must equal: widen W to float32 exactly, kernels.merge
(the PEFT-verified float32 merge), round once to nearest-even; the
conversions are checked exhaustively (widening) or on every rounding
boundary (rounding) against references written without the kernels' tricks.
"""

import numba
import numpy as np
import pytest
from numba import njit

from numba_lora import LoraDtypeError, LoraShapeError, LoraTypeError, kernels

from .helpers import merged_half_reference, round_bf16_reference, tricky_float32_bits

MERGES = {"bf16": (kernels.merge_bf16, kernels.merge_bf16_serial),
          "f16": (kernels.merge_f16, kernels.merge_f16_serial)}


def _half_bits(rng, shape, fmt, scale=0.05):
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    x.ravel()[::7] = 0.0
    x.ravel()[3::11] = -0.0
    if fmt == "bf16":
        return round_bf16_reference(x).reshape(shape)
    return x.astype(np.float16).view(np.uint16)


# ------------------------------------------------------------- conversions
def test_widen_is_exact_for_every_half():
    bits = np.arange(2**16, dtype=np.uint16)
    out = kernels.widen_f16(bits, np.empty(2**16, np.float32))
    expected = bits.view(np.float16).astype(np.float32)
    assert np.array_equal(out.view(np.uint32), expected.view(np.uint32))
    out = kernels.widen_bf16(bits, np.empty(2**16, np.float32))
    assert np.array_equal(out.view(np.uint32), bits.astype(np.uint32) << 16)


def test_round_f16_matches_numpy_on_every_boundary(rng):
    u = tricky_float32_bits(rng)
    x = u.view(np.float32)
    got = kernels.round_f16(x, np.empty(x.size, np.uint16))
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], expected[~nan])
    # NaN: a quiet NaN of the same sign.
    assert np.all((got[nan] & 0x7E00) == 0x7E00)
    assert np.array_equal(got[nan] >> 15, (u[nan] >> 31).astype(np.uint16))


def test_round_bf16_matches_the_reference_on_every_boundary(rng):
    u = tricky_float32_bits(rng)
    x = u.view(np.float32)
    got = kernels.round_bf16(x, np.empty(x.size, np.uint16))
    assert np.array_equal(got, round_bf16_reference(x))


def test_round_bf16_ties_and_overflow():
    cases = {0x3F808000: 0x3F80,   # 1 + 2**-8, a tie, below even: down
             0x3F818000: 0x3F82,   # a tie above an odd: up
             0x3F808001: 0x3F81,   # just past the tie: up
             0x7F7F7FFF: 0x7F7F,   # below the midpoint to infinity
             0x7F7F8000: 0x7F80,   # the midpoint, odd below: infinity
             0x00008000: 0x0000,   # a subnormal tie to even zero
             0x80018000: 0x8002}   # negative tie up to even
    x = np.array(list(cases), np.uint32).view(np.float32)
    got = kernels.round_bf16(x, np.empty(x.size, np.uint16))
    assert [int(v) for v in got] == list(cases.values())


def test_conversions_refuse_wrong_types():
    with pytest.raises(LoraDtypeError, match="round_bf16: out must have dtype uint16"):
        kernels.round_bf16(np.zeros(3, np.float32), np.zeros(3, np.int16))
    with pytest.raises(LoraDtypeError, match="widen_f16: bits must have dtype uint16"):
        kernels.widen_f16(np.zeros(3, np.float16).view(np.int16), np.zeros(3, np.float32))
    with pytest.raises(LoraShapeError, match="same length"):
        kernels.widen_bf16(np.zeros(3, np.uint16), np.zeros(4, np.float32))


# ------------------------------------------------------------------ merges
@pytest.mark.parametrize("fmt", ["bf16", "f16"])
@pytest.mark.parametrize("shape,rank", [
    ((1, 1), 1), ((5, 7), 3), ((4, 33), 1), ((9, 1100), 16), ((37, 70), 200), ((0, 5), 2),
    ((3, 0), 2), ((64, 48), 64)])
def test_merge_half_is_float32_merge_rounded_once(rng, fmt, shape, rank):
    W = _half_bits(rng, shape, fmt)
    A = (rng.standard_normal((rank, shape[1])) * 0.3).astype(np.float32)
    B = (rng.standard_normal((shape[0], rank)) * 0.3).astype(np.float32)
    scaling = 16 / np.sqrt(rank)
    expected = merged_half_reference(W, A, B, scaling, fmt)
    for kernel in MERGES[fmt]:
        got = W.copy()
        kernel(got, A, B, scaling)
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("fmt", ["bf16", "f16"])
def test_merge_half_rounds_large_and_tiny_sums(rng, fmt):
    # Sums that overflow the format, land in its subnormals, or cancel to zero.
    big = 3.0e38 if fmt == "bf16" else 6.0e4
    W = np.array([[big, -big, 1e-6, 0.0, 1.0, -1.0]], np.float32)
    W = round_bf16_reference(W).reshape(W.shape) if fmt == "bf16" else \
        W.astype(np.float16).view(np.uint16)
    A = np.ones((1, 6), np.float32)
    B = np.array([[1.0]], np.float32)
    deltas = [big, -big, -1e-6, 1e-8, -1.0, 1.0]
    for scaling in deltas:
        expected = merged_half_reference(W, A, B, scaling, fmt)
        got = W.copy()
        MERGES[fmt][0](got, A, B, scaling)
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("fmt", ["bf16", "f16"])
def test_merge_half_same_bits_for_any_thread_count(rng, fmt):
    W = _half_bits(rng, (203, 1030), fmt)
    A = rng.standard_normal((16, 1030)).astype(np.float32)
    B = rng.standard_normal((203, 16)).astype(np.float32)
    results = []
    previous = numba.get_num_threads()
    try:
        for n in sorted({1, 2, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(n)
            got = W.copy()
            MERGES[fmt][0](got, A, B, 0.7)
            results.append(got)
    finally:
        numba.set_num_threads(previous)
    for got in results[1:]:
        np.testing.assert_array_equal(got, results[0])


@njit
def _user_merge(W, A, B, scaling):
    # A user's own @njit code calling the public kernels.
    kernels.merge_bf16_serial(W, A, B, scaling)
    out = np.empty(W.size, np.float32)
    kernels.widen_bf16(W.ravel(), out)
    return out


def test_kernels_called_from_user_njit_code(rng):
    W = _half_bits(rng, (6, 10), "bf16")
    A = rng.standard_normal((2, 10)).astype(np.float32)
    B = rng.standard_normal((6, 2)).astype(np.float32)
    got = W.copy()
    widened = _user_merge(got, A, B, 1.5)
    np.testing.assert_array_equal(got, merged_half_reference(W, A, B, 1.5, "bf16"))
    np.testing.assert_array_equal(widened.view(np.uint32), got.ravel().astype(np.uint32) << 16)


def test_merge_half_refuses_wrong_arguments():
    # Each refused type compiles a refusing function: a few cover the guard
    # (the four merges share it, and _check_lora_shapes with kernels.merge).
    kernel = kernels.merge_bf16
    W = np.zeros((4, 3), np.uint16)
    A = np.zeros((2, 3), np.float32)
    B = np.zeros((4, 2), np.float32)
    with pytest.raises(LoraDtypeError, match="merge_bf16: W must have dtype uint16"):
        kernel(W.astype(np.float32), A, B, 1.0)
    with pytest.raises(LoraDtypeError, match="merge_bf16: A must have dtype float32"):
        kernel(W, A.astype(np.float64), B, 1.0)
    W.flags.writeable = False
    with pytest.raises(LoraTypeError, match="W is written to and must be writable"):
        kernel(W, A, B, 1.0)
    with pytest.raises(LoraShapeError, match="B must be"):
        kernel(np.zeros((5, 3), np.uint16), A, B, 1.0)
    with pytest.raises(LoraShapeError, match="C-contiguous"):
        kernel(np.zeros((4, 6), np.uint16)[:, ::2], A, B, 1.0)
