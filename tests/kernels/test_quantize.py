"""numba_lora.kernels.quantize against the NumPy statement of bitsandbytes' rules and its fixtures.

From Python and from user-style @njit code; hostile shapes and types are
refused before any array is touched.  The kernels are float32-only (the
format is), so float64 arrays are a compile-time LoraDtypeError.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numba import njit, prange

from numba_lora import LoraConfigError, LoraDtypeError, LoraNonFiniteError, LoraShapeError, \
    LoraTypeError
from numba_lora.kernels import quantize as K

HERE = Path(__file__).resolve().parents[1] / "fixtures" / "nf4"
sys.path.insert(0, str(HERE))
import nf4_reference as R  # noqa: E402  (tests/fixtures/nf4/nf4_reference.py)
CODES = np.load(HERE / "codes.npz")
CODE = CODES["nf4"]
DYN = CODES["dynamic"]


def _bits(a):
    return np.asarray(a).view(np.uint32 if np.asarray(a).dtype == np.float32 else np.uint8)


def _quantize(W, blocksize):
    flat = np.ascontiguousarray(W, dtype=np.float32).reshape(-1)
    n = flat.size
    packed = np.empty((n + 1) // 2, np.uint8)
    absmax = np.empty(-(-n // blocksize), np.float32)
    K.quantize_nf4(flat, CODE, blocksize, packed, absmax)
    return packed, absmax


def _lut():
    lut = np.empty(K.LUT_SIZE, np.uint8)
    return K.dynamic_lut(DYN, lut)


# ------------------------------------------------------------ user-style callers
@njit
def user_roundtrip(W, code, blocksize):
    n = W.size
    packed = np.empty((n + 1) // 2, dtype=np.uint8)
    absmax = np.empty((n + blocksize - 1) // blocksize, dtype=np.float32)
    K.quantize_nf4(W.reshape(n), code, blocksize, packed, absmax)
    out = np.empty(W.shape, dtype=np.float32)
    K.dequantize_nf4(packed, absmax, code, blocksize, 0, out)
    return packed, absmax, out


@njit(parallel=True)
def user_tiles(packed, absmax, code, blocksize, out_features, in_features, tile):
    # The serial kernel inside the caller's own prange: one tile of rows per task.
    out = np.empty((out_features, in_features), dtype=np.float32)
    tiles = (out_features + tile - 1) // tile
    for t in prange(tiles):
        r0 = t * tile
        r1 = min(out_features, r0 + tile)
        K.dequantize_nf4_serial(packed, absmax, code, blocksize, r0, out[r0:r1])
    return out


@njit
def user_double_quant(absmax, offset, nested_code):
    lut = np.empty(65536, dtype=np.uint8)
    K.dynamic_lut(nested_code, lut)
    q = np.empty(absmax.shape[0], dtype=np.uint8)
    nested = np.empty((absmax.shape[0] + 255) // 256, dtype=np.float32)
    K.quantize_absmax(absmax, offset, lut, q, nested)
    restored = np.empty(absmax.shape[0], dtype=np.float32)
    K.dequantize_absmax(q, nested, nested_code, offset, restored)
    return q, nested, restored


@njit
def user_float64(W, code, blocksize, packed, absmax):
    return K.quantize_nf4(W, code, blocksize, packed, absmax)


# A user's fastmath=True function: Numba compiles the kernels it calls with
# its flags (flag inheritance), and that compilation stays in the dispatcher.
@njit(fastmath=True)
def user_fastmath_roundtrip(W, code, blocksize, packed, absmax, out):
    K.quantize_nf4(W, code, blocksize, packed, absmax)
    K.dequantize_nf4(packed, absmax, code, blocksize, 0, out)
    return out


@njit(fastmath=True)
def user_fastmath_double_quant(absmax, offset, nested_code, lut, q, nested, restored):
    K.dynamic_lut(nested_code, lut)
    K.quantize_absmax(absmax, offset, lut, q, nested)
    K.dequantize_absmax(q, nested, nested_code, offset, restored)
    return restored


def test_fastmath_callers_get_the_same_bits(rng):
    W = (rng.standard_normal((9, 333)) * 10.0 ** rng.uniform(-3, 3, (9, 1))).astype(np.float32)
    packed, absmax = np.empty((W.size + 1) // 2, np.uint8), np.empty(47, np.float32)
    out = np.empty(W.shape, np.float32)
    user_fastmath_roundtrip(W.reshape(-1), CODE, 64, packed, absmax, out)
    P, A = R.quantize(W, CODE, 64)
    assert np.array_equal(packed, P) and np.array_equal(_bits(absmax), _bits(A))
    assert np.array_equal(_bits(out), _bits(R.dequantize(P, A, CODE, 64, W.shape)))
    a = (np.abs(rng.standard_normal(600)) * 10.0 ** rng.uniform(-3, 2)).astype(np.float32)
    offset = R.mean_offset(a)
    lut, q = np.empty(65536, np.uint8), np.empty(600, np.uint8)
    nested, restored = np.empty(3, np.float32), np.empty(600, np.float32)
    user_fastmath_double_quant(a, offset, DYN, lut, q, nested, restored)
    Q, N = R.quantize_absmax(a, offset, DYN)
    assert np.array_equal(lut, R.dynamic_lut(DYN))
    assert np.array_equal(q, Q) and np.array_equal(_bits(nested), _bits(N))
    assert np.array_equal(_bits(restored), _bits(R.restore_absmax(Q, N, DYN, offset)))
    # NaN checks are on the bits: nnan cannot fold them away.
    a[7] = np.nan
    with pytest.raises(LoraNonFiniteError):
        user_fastmath_double_quant(a, offset, DYN, lut, q, nested, restored)
    W[3, 3] = np.inf
    with pytest.raises(LoraNonFiniteError):
        user_fastmath_roundtrip(W.reshape(-1), CODE, 64, packed, absmax, out)


def test_user_njit_roundtrip_matches_reference(rng):
    W = rng.standard_normal((7, 45)).astype(np.float32)
    packed, absmax, out = user_roundtrip(W, CODE, 32)
    P, A = R.quantize(W, CODE, 32)
    assert np.array_equal(packed, P) and np.array_equal(_bits(absmax), _bits(A))
    assert np.array_equal(_bits(out), _bits(R.dequantize(P, A, CODE, 32, W.shape)))


def test_user_prange_tiles_equal_whole(rng):
    W = rng.standard_normal((37, 50)).astype(np.float32)
    packed, absmax = _quantize(W, 64)
    whole = np.empty(W.shape, np.float32)
    K.dequantize_nf4(packed, absmax, CODE, 64, 0, whole)
    for tile in (1, 4, 37):
        assert np.array_equal(_bits(user_tiles(packed, absmax, CODE, 64, 37, 50, tile)), _bits(whole))


def test_user_njit_double_quant(rng):
    absmax = np.abs(rng.standard_normal(300)).astype(np.float32)
    offset = R.mean_offset(absmax)
    q, nested, restored = user_double_quant(absmax, offset, DYN)
    Q, N = R.quantize_absmax(absmax, offset, DYN)
    assert np.array_equal(q, Q) and np.array_equal(_bits(nested), _bits(N))
    assert np.array_equal(_bits(restored), _bits(R.restore_absmax(Q, N, DYN, offset)))


def test_float64_is_refused_when_compiled():
    W = np.zeros(64)
    with pytest.raises(LoraDtypeError, match="quantize_nf4: W must have dtype float32"):
        user_float64(W, CODE, 64, np.empty(32, np.uint8), np.empty(1, np.float32))
    with pytest.raises(LoraDtypeError, match="quantize_nf4: W"):
        K.quantize_nf4(W, CODE, 64, np.empty(32, np.uint8), np.empty(1, np.float32))


# ------------------------------------------------------------------ fixtures
def _cases():
    with np.load(HERE / "quantize.npz") as data:
        fields = {}
        for key in data.files:
            name, field = key.split("/")
            fields.setdefault(name, {})[field] = data[key]
    return fields


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_bitsandbytes_fixture_bit_for_bit(name):
    case = CASES[name]
    bs = int(case["blocksize"])
    packed, absmax = _quantize(case["W"], bs)
    assert np.array_equal(packed, case["packed"])
    if "absmax" in case:
        assert np.array_equal(_bits(absmax), _bits(case["absmax"]))
        scales = absmax
    else:
        # Given bitsandbytes' offset, the 8-bit state and the restore are its bits.
        offset = float(case["offset"])
        q = np.empty(absmax.size, np.uint8)
        nested = np.empty(-(-absmax.size // 256), np.float32)
        K.quantize_absmax(absmax, offset, _lut(), q, nested)
        assert np.array_equal(q, case["absmax_q"])
        assert np.array_equal(_bits(nested), _bits(case["nested_absmax"]))
        scales = np.empty(absmax.size, np.float32)
        K.dequantize_absmax(case["absmax_q"], case["nested_absmax"], case["nested_code"], offset,
                            scales)
        assert np.array_equal(_bits(scales), _bits(case["absmax_restored"]))
    if "dequantized" in case:
        out = np.empty(case["W"].shape, np.float32)
        K.dequantize_nf4(case["packed"], scales, CODE, bs, 0, out)
        assert np.array_equal(_bits(out), _bits(case["dequantized"]))


def test_dynamic_lut_matches_reference():
    assert np.array_equal(_lut(), R.dynamic_lut(DYN))


# ------------------------------------------------------------ property tests
@given(rows=st.integers(1, 9), cols=st.integers(1, 70),
       blocksize=st.sampled_from([32, 64, 128]), seed=st.integers(0, 2**32 - 1),
       zeros=st.booleans())
def test_quantize_dequantize_match_reference(rows, cols, blocksize, seed, zeros):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((rows, cols)) * 10.0 ** rng.uniform(-3, 3, (rows, 1)))
    W = W.astype(np.float32)
    if zeros:
        W.ravel()[rng.integers(0, W.size):] = 0.0
    packed, absmax = _quantize(W, blocksize)
    P, A = R.quantize(W, CODE, blocksize)
    assert np.array_equal(packed, P)
    assert np.array_equal(_bits(absmax), _bits(A))
    row0 = int(rng.integers(0, rows))
    out = np.empty((rows - row0, cols), np.float32)
    K.dequantize_nf4(packed, absmax, CODE, blocksize, row0, out)
    expected = R.dequantize(P, A, CODE, blocksize, W.shape)[row0:]
    assert np.array_equal(_bits(out), _bits(expected))


@given(n=st.integers(1, 700), seed=st.integers(0, 2**32 - 1), same=st.booleans())
def test_double_quant_matches_reference(n, seed, same):
    rng = np.random.default_rng(seed)
    absmax = (np.abs(rng.standard_normal(n)) * 10.0 ** rng.uniform(-4, 2)).astype(np.float32)
    if same:  # a block equal to the offset everywhere: nested absmax 0, codes 0
        absmax[:] = absmax[0]
    offset = R.mean_offset(absmax)
    q = np.empty(n, np.uint8)
    nested = np.empty(-(-n // 256), np.float32)
    K.quantize_absmax(absmax, offset, _lut(), q, nested)
    Q, N = R.quantize_absmax(absmax, offset, DYN)
    assert np.array_equal(q, Q) and np.array_equal(_bits(nested), _bits(N))
    restored = np.empty(n, np.float32)
    K.dequantize_absmax(q, nested, DYN, offset, restored)
    assert np.array_equal(_bits(restored), _bits(R.restore_absmax(Q, N, DYN, offset)))


def test_ties_take_the_lower_code():
    mid = ((CODE[:-1] + CODE[1:]) / np.float32(2)).astype(np.float32)
    W = np.concatenate([[1.0], mid, np.zeros(64 - 1 - mid.size)]).astype(np.float32)
    packed, _ = _quantize(W, 64)
    q = R.unpack(packed, W.size)
    assert q[0] == 15 and list(q[1:16]) == list(range(15))


def test_thread_count_does_not_change_bits(rng):
    import numba

    W = rng.standard_normal((40, 333)).astype(np.float32)
    first = _quantize(W, 32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        second = _quantize(W, 32)
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])


# ----------------------------------------------------------------- hostile
def _untouched(*arrays):
    return [a.copy() for a in arrays]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_refused_and_nothing_written(bad):
    W = np.ones(100, np.float32)
    W[77] = bad
    packed = np.full(50, 0xAB, np.uint8)
    absmax = np.full(2, 3.0, np.float32)
    with pytest.raises(LoraNonFiniteError, match="inf or NaN"):
        K.quantize_nf4(W, CODE, 64, packed, absmax)
    assert (packed == 0xAB).all() and (absmax == 3.0).all()


@pytest.mark.parametrize("blocksize", [0, -64, 16, 48, 8192, 100])
def test_bad_blocksize(blocksize):
    packed = np.zeros(32, np.uint8)
    absmax = np.zeros(1, np.float32)
    with pytest.raises(LoraConfigError, match="blocksize"):
        K.quantize_nf4(np.zeros(64, np.float32), CODE, blocksize, packed, absmax)
    with pytest.raises(LoraConfigError, match="blocksize"):
        K.dequantize_nf4(packed, absmax, CODE, blocksize, 0, np.empty((1, 64), np.float32))


@pytest.mark.parametrize("n_packed, n_absmax, n_code, n", [
    (31, 1, 16, 64), (33, 1, 16, 64), (32, 2, 16, 64), (32, 0, 16, 64), (32, 1, 15, 64),
    (0, 0, 16, 0),
])
def test_quantize_wrong_sizes(n_packed, n_absmax, n_code, n):
    packed = np.full(n_packed, 1, np.uint8)
    absmax = np.full(n_absmax, 2, np.float32)
    with pytest.raises(LoraShapeError):
        K.quantize_nf4(np.zeros(n, np.float32), np.zeros(n_code, np.float32), 64, packed, absmax)
    assert (packed == 1).all() and (absmax == 2).all()


@pytest.mark.parametrize("row0, rows, cols, n_packed, n_absmax", [
    (0, 3, 64, 95, 3),     # one byte short
    (0, 3, 64, 96, 2),     # one block short
    (1, 3, 64, 96, 3),     # rows past the end
    (-1, 1, 64, 96, 3),    # negative start
    (3, 1, 64, 96, 3),
    (2**61, 1, 64, 96, 3),  # (row0 + rows) * in_features overflows int64
    (2**62, 1, 4, 96, 3),
])
def test_dequantize_out_of_range(row0, rows, cols, n_packed, n_absmax):
    out = np.full((rows, cols), 7.0, np.float32)
    with pytest.raises(LoraShapeError):
        K.dequantize_nf4(np.zeros(n_packed, np.uint8), np.ones(n_absmax, np.float32), CODE, 64,
                         row0, out)
    assert (out == 7.0).all()


def test_dequantize_types_refused():
    packed, absmax = np.zeros(32, np.uint8), np.ones(1, np.float32)
    with pytest.raises(LoraDtypeError, match="packed must have dtype uint8"):
        K.dequantize_nf4(packed.astype(np.int8), absmax, CODE, 64, 0, np.empty((1, 64), np.float32))
    with pytest.raises(LoraDtypeError, match="out must have dtype float32"):
        K.dequantize_nf4(packed, absmax, CODE, 64, 0, np.empty((1, 64)))
    with pytest.raises(LoraShapeError, match="out must be 2-D"):
        K.dequantize_nf4(packed, absmax, CODE, 64, 0, np.empty(64, np.float32))
    ro = np.empty((1, 64), np.float32)
    ro.flags.writeable = False
    with pytest.raises(LoraTypeError, match="writable"):
        K.dequantize_nf4(packed, absmax, CODE, 64, 0, ro)
    with pytest.raises(LoraShapeError, match="contiguous"):
        K.dequantize_nf4(packed, np.ones(2, np.float32), CODE, 32, 0,
                         np.empty((2, 64), np.float32)[:, ::2])


def test_double_quant_hostile():
    lut = _lut()
    absmax = np.ones(10, np.float32)
    q, nested = np.full(10, 9, np.uint8), np.full(1, 5.0, np.float32)
    for bad in (np.nan, np.inf):
        a = absmax.copy()
        a[3] = bad
        with pytest.raises(LoraNonFiniteError):
            K.quantize_absmax(a, 1.0, lut, q, nested)
        with pytest.raises(LoraNonFiniteError):
            K.quantize_absmax(absmax, bad, lut, q, nested)
    with pytest.raises(LoraShapeError, match="lut"):
        K.quantize_absmax(absmax, 1.0, lut[:100], q, nested)
    with pytest.raises(LoraShapeError, match="nested_absmax"):
        K.quantize_absmax(absmax, 1.0, lut, q, np.zeros(2, np.float32))
    assert (q == 9).all() and (nested == 5.0).all()
    out = np.full(10, 4.0, np.float32)
    with pytest.raises(LoraShapeError, match="nested_code"):
        K.dequantize_absmax(q, nested, DYN[:255], 0.0, out)
    with pytest.raises(LoraShapeError, match="out"):
        K.dequantize_absmax(q, nested, DYN, 0.0, out[:9])
    with pytest.raises(LoraShapeError, match="nested_absmax"):
        K.dequantize_absmax(q, np.zeros(0, np.float32), DYN, 0.0, out)
    assert (out == 4.0).all()


@pytest.mark.parametrize("name", ["quantize_nf4", "dequantize_nf4", "dequantize_nf4_serial",
                                  "dynamic_lut", "quantize_absmax", "dequantize_absmax"])
def test_untypeable_arguments_from_python(name):
    import inspect

    kernel = getattr(K, name)
    n = len(inspect.signature(kernel.py_func).parameters)
    with pytest.raises(LoraTypeError, match=f"kernels.{name}"):
        kernel(*([{"not": "an array"}] * n))
