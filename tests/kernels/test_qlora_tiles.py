"""numba_lora.kernels.qlora_tiles: batches above SMALL_BATCH rows, tiles of W on Numba's threads.

Against a float64 NumPy reference (each weight rounded to float32 first, as
promised), on shapes whose tiles do not divide out_features, with an odd
element count and in_features not a multiple of blocksize; and the BLAS
thread count, which the kernel sets to 1 for its loop, is back as it was
after every call, refused ones included.
"""

import os
import subprocess
import sys

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

import reference as ref
from numba_lora.errors import LoraShapeError
from numba_lora.kernels import _blas, qlora, qlora_tiles

CODE = qlora.NF4_CODE
HAS_CONTROL = _blas.blas_threads() is not None


def nf4_case(rng, out_features, in_features, blocksize, rank, dq=False):
    n = out_features * in_features
    nblocks = -(-n // blocksize)
    case = dict(packed=rng.integers(0, 256, (n + 1) // 2, dtype=np.uint8),
                absmax=rng.uniform(0.05, 2.0, nblocks).astype(np.float32),
                blocksize=blocksize, shape=(out_features, in_features),
                A=rng.uniform(-1, 1, (rank, in_features)).astype(np.float32),
                B=rng.standard_normal((out_features, rank)).astype(np.float32))
    if dq:
        case["absmax_q"] = rng.integers(0, 256, nblocks, dtype=np.uint8)
        case["nested_absmax"] = rng.uniform(0.5, 2.0, -(-nblocks // 256)).astype(np.float32)
        case["nested_code"] = np.sort(rng.uniform(-1, 1, 256)).astype(np.float32)
        case["offset"] = np.float32(rng.uniform(0.5, 1.0))
    return case


def dequantized(case, dq):
    """W in float64, each weight ``code[q] * absmax[b]`` rounded to float32 first."""
    out_features, in_features = case["shape"]
    n = out_features * in_features
    q = np.empty(2 * case["packed"].size, np.uint8)
    q[0::2] = case["packed"] >> 4
    q[1::2] = case["packed"] & 15
    if dq:
        qa, na, nc = case["absmax_q"], case["nested_absmax"], case["nested_code"]
        absmax = ((nc[qa] * na[np.arange(qa.size) // 256]).astype(np.float32)
                  + np.float32(case["offset"])).astype(np.float32)
    else:
        absmax = case["absmax"]
    scale = np.repeat(absmax, case["blocksize"])[:n]
    return (CODE[q[:n]] * scale).astype(np.float32).astype(np.float64).reshape(
        out_features, in_features)


def storage(case, dq):
    if dq:
        return (case["packed"], case["absmax_q"], case["nested_absmax"], case["nested_code"],
                case["offset"], case["blocksize"])
    return case["packed"], case["absmax"], CODE, case["blocksize"]


KERNELS = {
    (False, "public"): qlora.forward_batch_nf4,
    (False, "portable"): qlora._forward_batch_nf4_portable,
    (True, "public"): qlora.forward_batch_nf4_dq,
    (True, "portable"): qlora._forward_batch_nf4_dq_portable,
}


def run(case, scaling, X, dq, path="public"):
    out = np.full((X.shape[0], case["shape"][0]), np.nan, np.float32)
    result = KERNELS[dq, path](*storage(case, dq), case["A"], case["B"], scaling, X, out)
    assert result is out
    return out


def check(case, scaling, X, dq, path="public"):
    out = run(case, scaling, X, dq, path)
    W = dequantized(case, dq)
    ref.assert_close(out, *ref.forward(W, case["A"], case["B"], scaling, X), np.float32)


# 1101 x 2051: odd element count (rows alternate between starting in a high
# and a low nibble), 2051 % 64 != 0 (blocks cross rows), tiles of
# tile_rows(1101, 2051) rows do not divide 1101.
SHAPE = (1101, 2051, 64)


def test_shape_makes_several_uneven_tiles():
    rows = qlora_tiles.tile_rows(SHAPE[0], SHAPE[1])
    assert 1 < rows < SHAPE[0] and SHAPE[0] % rows != 0
    assert rows * SHAPE[1] * 4 <= max(qlora_tiles.TILE_BYTES,
                                      qlora_tiles.MIN_TILE_ROWS * SHAPE[1] * 4)


def test_tile_rows_bounds():
    assert qlora_tiles.tile_rows(5, 3) == 5          # never more rows than W has
    assert qlora_tiles.tile_rows(4096, 10 ** 7) == qlora_tiles.MIN_TILE_ROWS
    assert qlora_tiles.tile_rows(4096, 4096) % 8 == 0


@pytest.mark.parametrize("path", ["public", "portable"])
@pytest.mark.parametrize("dq", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("batch", [17, 64, 65, 300])
def test_batches_match_reference(batch, dq, path, rng):
    case = nf4_case(rng, *SHAPE, rank=3, dq=dq)
    X = rng.standard_normal((batch, SHAPE[1])).astype(np.float32)
    check(case, -0.75, X, dq, path)


@pytest.mark.parametrize("dq", [False, True], ids=["absmax", "double-quant"])
def test_aligned_shape_and_no_low_rank_term(dq, rng):
    case = nf4_case(rng, 300, 2048, 128, rank=0, dq=dq)
    X = rng.standard_normal((33, 2048)).astype(np.float32)
    check(case, 0.5, X, dq)
    case = nf4_case(rng, 300, 2048, 128, rank=4, dq=dq)
    check(case, 0.0, X, dq)


@st.composite
def shapes(draw):
    out_features = draw(st.integers(1, 260))
    in_features = draw(st.integers(1, 2600))
    blocksize = draw(st.sampled_from([32, 64, 128, 4096]))
    batch = draw(st.integers(qlora.SMALL_BATCH + 1, 40))
    return out_features, in_features, blocksize, batch


@given(shapes(), st.booleans(), st.sampled_from([0.0, 1.25]), st.integers(0, 2 ** 32 - 1))
def test_property_matches_reference(shape, dq, scaling, seed):
    out_features, in_features, blocksize, batch = shape
    rng = np.random.default_rng(seed)
    case = nf4_case(rng, out_features, in_features, blocksize, rank=2, dq=dq)
    X = rng.standard_normal((batch, in_features)).astype(np.float32)
    check(case, scaling, X, dq)


# The loops with any tile size (the public kernels pick one per shape):
# many small tiles, a last one short, one row per tile.
LOOPS = qlora_tiles.build_tiles("test", qlora._FAST[4], qlora._dq_absmax)


@settings(max_examples=20)  # one-row tiles make hundreds of sgemm calls per example
@given(shapes(), st.booleans(), st.integers(1, 300), st.integers(0, 2 ** 32 - 1))
def test_property_any_tile_rows(shape, dq, rows, seed):
    out_features, in_features, blocksize, batch = shape
    rng = np.random.default_rng(seed)
    case = nf4_case(rng, out_features, in_features, blocksize, rank=2, dq=dq)
    X = rng.standard_normal((batch, in_features)).astype(np.float32)
    out = np.full((batch, out_features), np.nan, np.float32)
    saved = _blas.blas_threads()
    _blas.set_blas_threads(1)
    try:
        if dq:
            LOOPS["loop_dq"](*storage(case, dq)[:5], CODE, case["blocksize"], X, case["A"],
                             case["B"], 0.5, out, rows)
        else:
            LOOPS["loop"](*storage(case, dq), X, case["A"], case["B"], 0.5, out, rows)
    finally:
        if saved is not None:
            _blas.set_blas_threads(saved)
    W = dequantized(case, dq)
    ref.assert_close(out, *ref.forward(W, case["A"], case["B"], 0.5, X), np.float32)


def test_one_numba_thread(rng):
    case = nf4_case(rng, *SHAPE, rank=2)
    X = rng.standard_normal((40, SHAPE[1])).astype(np.float32)
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        check(case, 1.5, X, False)
        check(nf4_case(rng, *SHAPE, rank=2, dq=True), 1.5, X, True)
    finally:
        numba.set_num_threads(before)


# ------------------------------------------------------- BLAS thread count
@pytest.fixture
def blas_threads():
    if not HAS_CONTROL:
        pytest.skip("the BLAS's thread count cannot be read here")
    before = _blas.blas_threads()
    yield
    _blas.set_blas_threads(before)


@pytest.mark.parametrize("dq", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("threads", [1, 2])
def test_blas_threads_restored(threads, dq, blas_threads, rng):
    _blas.set_blas_threads(threads)
    threads = _blas.blas_threads()  # OpenBLAS caps the count at its pool's size
    case = nf4_case(rng, *SHAPE, rank=2, dq=dq)
    X = rng.standard_normal((20, SHAPE[1])).astype(np.float32)
    check(case, 0.5, X, dq)
    assert _blas.blas_threads() == threads


@pytest.mark.parametrize("dq", [False, True], ids=["absmax", "double-quant"])
def test_refused_call_leaves_arrays_and_blas_threads(dq, blas_threads, rng):
    _blas.set_blas_threads(2)
    threads = _blas.blas_threads()
    case = nf4_case(rng, *SHAPE, rank=2, dq=dq)
    X = rng.standard_normal((20, SHAPE[1])).astype(np.float32)
    args = storage(case, dq) + (case["A"], case["B"], 0.5, X)
    for out in (np.full((20, SHAPE[0] + 1), 7, np.float32),   # wrong out_features
                np.full((19, SHAPE[0]), 7, np.float32),       # wrong batch
                np.full((SHAPE[0], 20), 7, np.float32).T):    # not C-contiguous
        kept = [np.array(a, copy=True) for a in args if isinstance(a, np.ndarray)]
        with pytest.raises(LoraShapeError):
            KERNELS[dq, "public"](*args, out)
        assert np.all(out == 7)
        for a, k in zip([a for a in args if isinstance(a, np.ndarray)], kept):
            assert np.array_equal(a, k)
        assert _blas.blas_threads() == threads


def test_blas_count_is_one_only_inside_the_call(blas_threads):
    @njit
    def probe():
        saved = qlora_tiles._one_blas_thread()
        inside = _blas._blas_get_threads()
        qlora_tiles._restore_blas_threads(saved)
        return saved, inside

    _blas.set_blas_threads(2)
    threads = _blas.blas_threads()
    assert probe() == (threads, 1)
    assert _blas.blas_threads() == threads


# ------------------------------------------------------ from user @njit code
@njit
def user_batch(packed, absmax, code, blocksize, A, B, scaling, X):
    out = np.empty((X.shape[0], B.shape[0]), dtype=np.float32)
    return qlora.forward_batch_nf4(packed, absmax, code, blocksize, A, B, scaling, X, out)


@njit
def user_batch_dq(packed, absmax_q, nested_absmax, nested_code, offset, blocksize, A, B,
                  scaling, X):
    out = np.empty((X.shape[0], B.shape[0]), dtype=np.float32)
    return qlora.forward_batch_nf4_dq(packed, absmax_q, nested_absmax, nested_code, offset,
                                      blocksize, A, B, scaling, X, out)


@pytest.mark.parametrize("dq", [False, True], ids=["absmax", "double-quant"])
def test_from_user_njit(dq, rng):
    case = nf4_case(rng, *SHAPE, rank=2, dq=dq)
    X = rng.standard_normal((24, SHAPE[1])).astype(np.float32)
    user = user_batch_dq if dq else user_batch
    out = user(*storage(case, dq), case["A"], case["B"], 0.5, X)
    W = dequantized(case, dq)
    ref.assert_close(out, *ref.forward(W, case["A"], case["B"], 0.5, X), np.float32)


# ------------------------------------------- a BLAS without thread control
_FALLBACK = """
import numpy as np
from numba_lora.kernels import _blas, qlora
assert _blas.blas_threads() is None, _blas.PROVIDER
rng = np.random.default_rng(3)
o, i, bs = 301, 2051, 64
packed = rng.integers(0, 256, (o * i + 1) // 2, dtype=np.uint8)
absmax = rng.uniform(0.05, 2.0, -(-(o * i) // bs)).astype(np.float32)
A = np.zeros((0, i), np.float32); B = np.zeros((o, 0), np.float32)
X = rng.standard_normal((20, i)).astype(np.float32)
out = qlora.forward_batch_nf4(packed, absmax, qlora.NF4_CODE, bs, A, B, 0.0, X,
                              np.empty((20, o), np.float32))
np.save({path!r}, out)
"""


def test_blas_without_thread_control_keeps_serial_path(tmp_path, rng):
    # NUMBA_LORA_BLAS=numpy-matmul binds the BLAS names to ctypes adapters,
    # which have no thread count: the kernel takes its serial tile loop.
    path = str(tmp_path / "out.npy")
    env = dict(os.environ, NUMBA_LORA_BLAS="numpy-matmul")
    subprocess.run([sys.executable, "-c", _FALLBACK.format(path=path)], env=env, check=True,
                   timeout=600)
    rng = np.random.default_rng(3)
    o, i, bs = 301, 2051, 64
    case = dict(packed=rng.integers(0, 256, (o * i + 1) // 2, dtype=np.uint8),
                absmax=rng.uniform(0.05, 2.0, -(-(o * i) // bs)).astype(np.float32),
                blocksize=bs, shape=(o, i))
    X = rng.standard_normal((20, i)).astype(np.float32)
    W = dequantized(case, False)
    zero_a, zero_b = np.zeros((0, i)), np.zeros((o, 0))
    ref.assert_close(np.load(path), *ref.forward(W, zero_a, zero_b, 0.0, X), np.float32)
