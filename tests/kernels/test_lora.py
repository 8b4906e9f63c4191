"""numba_lora.kernels against the float64 references, from Python and from user @njit code."""

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numba import njit, prange

import reference as ref
from numba_lora import LoraDtypeError, LoraShapeError, kernels


# --------------------------------------------------------------------------
# User-style @njit callers: what a user embedding the kernels writes.
@njit
def user_forward(W, A, B, scaling, x):
    out = np.empty(W.shape[0], dtype=W.dtype)
    return kernels.forward(W, A, B, scaling, x, out)


@njit
def user_forward_batch(W, A, B, scaling, X):
    out = np.empty((X.shape[0], W.shape[0]), dtype=W.dtype)
    return kernels.forward_batch(W, A, B, scaling, X, out)


@njit
def user_merge_unmerge(W, A, B, scaling):
    merged = W.copy()
    kernels.merge(merged, A, B, scaling)
    unmerged = merged.copy()
    kernels.unmerge(unmerged, A, B, scaling)
    return merged, unmerged


@njit(parallel=True)
def user_merge_many(Ws, A, B, scaling):
    # The serial kernels are for a caller's own prange loop.
    for i in prange(Ws.shape[0]):
        kernels.merge_serial(Ws[i], A, B, scaling)


@njit(parallel=True)
def user_unmerge_many(Ws, A, B, scaling):
    for i in prange(Ws.shape[0]):
        kernels.unmerge_serial(Ws[i], A, B, scaling)


@njit
def user_count_nonfinite(W, A, B, scaling):
    return kernels.count_nonfinite_merged(W, A, B, scaling)


def test_forward_from_user_njit(dtype, rng):
    W, A, B = ref.random_lora(rng, 13, 9, 3, dtype)
    x = rng.standard_normal(9).astype(dtype)
    y = user_forward(W, A, B, 0.5, x)
    assert y.dtype == dtype
    ref.assert_close(y, *ref.forward(W, A, B, 0.5, x), dtype)


def test_forward_batch_from_user_njit(dtype, rng):
    W, A, B = ref.random_lora(rng, 13, 9, 3, dtype)
    X = rng.standard_normal((5, 9)).astype(dtype)
    Y = user_forward_batch(W, A, B, 2.0, X)
    assert Y.dtype == dtype
    ref.assert_close(Y, *ref.forward(W, A, B, 2.0, X), dtype)


def test_merge_unmerge_from_user_njit(dtype, rng):
    W, A, B = ref.random_lora(rng, 11, 7, 2, dtype)
    merged, unmerged = user_merge_unmerge(W, A, B, 1.5)
    ref.assert_close(merged, *ref.merged(W, A, B, 1.5), dtype)
    ref.assert_close(unmerged, W.astype(np.float64), *ref.merged(W, A, B, 1.5)[1:], dtype)


def test_serial_kernels_inside_user_prange(dtype, rng):
    W, A, B = ref.random_lora(rng, 10, 6, 2, dtype)
    Ws = np.stack([W, 2 * W, -W])
    original = Ws.copy()
    user_merge_many(Ws, A, B, 0.25)
    for i in range(3):
        ref.assert_close(Ws[i], *ref.merged(original[i], A, B, 0.25), dtype)
    once = Ws.copy()
    for i in range(3):  # the serial kernel, run here, matches itself bitwise
        kernels.merge_serial(original[i], A, B, 0.25)
    np.testing.assert_array_equal(Ws, original)
    user_unmerge_many(Ws, A, B, 0.25)
    for i in range(3):
        ref.assert_close(Ws[i], *ref.merged(once[i], A, B, 0.25, sign=-1.0), dtype)


def test_count_nonfinite_from_user_njit(dtype, rng):
    W, A, B = ref.random_lora(rng, 8, 5, 2, dtype)
    assert user_count_nonfinite(W, A, B, 1.0) == 0
    W[3, 4] = np.nan
    W[0, 0] = np.inf
    assert user_count_nonfinite(W, A, B, 1.0) == 2


# --------------------------------------------------------------------------
# Property tests from Python.
@st.composite
def lora_case(draw, max_dim=40):
    out_features = draw(st.integers(1, max_dim))
    in_features = draw(st.integers(1, max_dim))
    rank = draw(st.integers(1, min(out_features, in_features)))
    dtype = draw(st.sampled_from(ref.DTYPES))
    scaling = draw(st.sampled_from([1.0, 0.5, 2.0, -1.25, 0.0, 1e-3]))
    seed = draw(st.integers(0, 2**32 - 1))
    return out_features, in_features, rank, np.dtype(dtype), scaling, seed


@given(lora_case(), st.integers(0, 9))
def test_forward_batch_matches_reference(case, batch):
    out_features, in_features, rank, dtype, scaling, seed = case
    rng = np.random.default_rng(seed)
    W, A, B = ref.random_lora(rng, out_features, in_features, rank, dtype)
    X = rng.standard_normal((batch, in_features)).astype(dtype)
    out = np.full((batch, out_features), np.nan, dtype=dtype)
    result = kernels.forward_batch(W, A, B, scaling, X, out)
    assert result is out or np.shares_memory(result, out)
    ref.assert_close(out, *ref.forward(W, A, B, scaling, X), dtype)


@given(lora_case())
def test_forward_matches_reference(case):
    out_features, in_features, rank, dtype, scaling, seed = case
    rng = np.random.default_rng(seed)
    W, A, B = ref.random_lora(rng, out_features, in_features, rank, dtype)
    x = rng.standard_normal(in_features).astype(dtype)
    out = np.full(out_features, np.nan, dtype=dtype)
    kernels.forward(W, A, B, scaling, x, out)
    ref.assert_close(out, *ref.forward(W, A, B, scaling, x), dtype)


@given(lora_case(max_dim=70))
def test_merge_unmerge_match_reference(case):
    out_features, in_features, rank, dtype, scaling, seed = case
    rng = np.random.default_rng(seed)
    W, A, B = ref.random_lora(rng, out_features, in_features, rank, dtype)
    original = W.copy()
    kernels.merge(W, A, B, scaling)
    ref.assert_close(W, *ref.merged(original, A, B, scaling), dtype)
    merged = W.copy()
    kernels.unmerge(W, A, B, scaling)
    ref.assert_close(W, *ref.merged(merged, A, B, scaling, sign=-1.0), dtype)
    # One rounding in each direction.
    bound = (np.spacing(np.abs(merged)) + np.spacing(np.abs(W))) / 2
    assert np.all(np.abs(W - original) <= bound)


def test_merge_is_the_fused_multiply_add_chain(dtype, rng):
    # Bit for bit: p = fma(B[i,k], A[k,j], p) over k from +0, then
    # delta = p * s (s rounded once to the dtype), then W + delta.
    for out_features, in_features, rank in ((7, 13, 1), (5, 9, 4), (6, 11, 7), (3, 1030, 9),
                                            (3, 5, 193), (2, 4, 400), (5, 37, 200)):
        W, A, B = ref.random_lora(rng, out_features, in_features, rank, dtype)
        W[0, :3] = [-0.0, 0.0, -0.0]
        B[0] = 0.0  # a zero delta: the sign of zero must follow from p = +0
        expected = ref.merged_exact(W, A, B, 0.7, +1)
        for merge in (kernels.merge, kernels.merge_serial):
            merged = W.copy()
            merge(merged, A, B, 0.7)
            ref.assert_bitwise_equal(merged, expected)
        unmerged = expected.copy()
        kernels.unmerge(unmerged, A, B, 0.7)
        ref.assert_bitwise_equal(unmerged, ref.merged_exact(expected, A, B, 0.7, -1))


def test_merge_covers_tile_edges(dtype, rng):
    # Shapes straddling ROW_BLOCK and COL_TILE boundaries, ranks around the
    # four-at-a-time unrolling.
    lora = kernels.lora
    for out_features in (lora.ROW_BLOCK - 1, lora.ROW_BLOCK + 1, 2 * lora.ROW_BLOCK):
        for in_features in (lora.COL_TILE - 1, lora.COL_TILE + 3):
            for rank in (1, 3, 4, 5, 8):
                W, A, B = ref.random_lora(rng, out_features, in_features, rank, dtype)
                expected = ref.merged(W, A, B, 0.75)
                serial = W.copy()
                kernels.merge_serial(serial, A, B, 0.75)
                kernels.merge(W, A, B, 0.75)
                ref.assert_close(W, *expected, dtype)
                ref.assert_bitwise_equal(W, serial)


def test_high_rank_merge_matches_reference(dtype, rng):
    W, A, B = ref.random_lora(rng, 300, 261, 259, dtype)
    original = W.copy()
    kernels.merge(W, A, B, 0.5)
    ref.assert_close(W, *ref.merged(original, A, B, 0.5), dtype)


def _cycle_check(merge, unmerge, W, A, B, cycles):
    original = W.copy()
    merge(W, A, B, 2.0)
    merged_first = W.copy()
    unmerge(W, A, B, 2.0)
    after_first = W.copy()
    for _ in range(cycles):
        merge(W, A, B, 2.0)
        unmerge(W, A, B, 2.0)
    ref.assert_bitwise_equal(W, after_first)
    merge(W, A, B, 2.0)
    ref.assert_bitwise_equal(W, merged_first)
    # One rounding each way: half an ulp of the merged value plus half an ulp
    # of the result (1 ulp of the original wherever the delta is small beside W).
    bound = (np.spacing(np.abs(merged_first)) + np.spacing(np.abs(after_first))) / 2
    assert np.all(np.abs(after_first - original) <= bound)


@pytest.mark.parametrize("path", ["parallel", "serial"])
def test_thousand_merge_cycles_do_not_drift(path, dtype, rng):
    W, A, B = ref.random_lora(rng, 33, 70, 5, dtype, b_scale=0.05)
    if path == "parallel":
        _cycle_check(kernels.merge, kernels.unmerge, W, A, B, 1000)
    else:
        _cycle_check(kernels.merge_serial, kernels.unmerge_serial, W, A, B, 1000)


def test_merge_is_independent_of_thread_count(dtype, rng):
    # Guaranteed by construction (threads split rows, never an element's
    # sum), so it must hold on every CPU and for any count; BLAS's thread
    # count is set too, to show merge does not depend on it either.
    threadpoolctl = pytest.importorskip("threadpoolctl")
    cases = [ref.random_lora(rng, 67, 1030, 8, dtype), ref.random_lora(rng, 131, 200, 130, dtype)]
    most = numba.config.NUMBA_NUM_THREADS  # 1 in CI's one-thread pass
    counts = sorted({1, min(2, most), most})
    results = {}
    unmerged = {}
    previous = numba.get_num_threads()
    try:
        for threads in counts:
            numba.set_num_threads(threads)
            with threadpoolctl.threadpool_limits(threads, user_api="blas"):
                results[threads] = []
                for W, A, B in cases:
                    W = W.copy()
                    kernels.merge(W, A, B, 0.5)
                    results[threads].append(W)
        # unmerge with another thread count than the merge had
        numba.set_num_threads(counts[0])
        for threads in counts:
            unmerged[threads] = []
            for (W, A, B), merged in zip(cases, results[counts[-1]]):
                merged = merged.copy()
                kernels.unmerge(merged, A, B, 0.5)
                unmerged[threads].append(merged)
            numba.set_num_threads(threads)
    finally:
        numba.set_num_threads(previous)
    for threads in counts[1:]:
        for one, other in zip(results[counts[0]], results[threads]):
            ref.assert_bitwise_equal(one, other)
        for one, other in zip(unmerged[counts[0]], unmerged[threads]):
            ref.assert_bitwise_equal(one, other)


def test_forward_with_one_or_two_blas_threads(dtype, rng):
    # forward/forward_batch are BLAS calls, and OpenBLAS may split a gemm's
    # sums differently by thread count (seen: float64 dgemm, ~1% of elements
    # differing by ~1e-13 relative).  Both must still meet the tolerance;
    # bitwise thread independence is promised for merge only.
    threadpoolctl = pytest.importorskip("threadpoolctl")
    W, A, B = ref.random_lora(rng, 300, 257, 8, dtype)
    x = rng.standard_normal(257).astype(dtype)
    X = rng.standard_normal((37, 257)).astype(dtype)
    for threads in (1, 2):
        with threadpoolctl.threadpool_limits(threads, user_api="blas"):
            y = kernels.forward(W, A, B, 0.5, x, np.empty(300, dtype))
            Y = kernels.forward_batch(W, A, B, 0.5, X, np.empty((37, 300), dtype))
        ref.assert_close(y, *ref.forward(W, A, B, 0.5, x), dtype)
        ref.assert_close(Y, *ref.forward(W, A, B, 0.5, X), dtype)


def test_scaling_zero_is_the_dense_product(dtype, rng):
    W, A, B = ref.random_lora(rng, 20, 30, 4, dtype)
    B[:] = np.nan  # must not be read at all
    x = rng.standard_normal(30).astype(dtype)
    y = kernels.forward(W, A, B, 0.0, x, np.empty(20, dtype))
    ref.assert_close(y, *ref.forward(W, A, np.zeros_like(B), 0.0, x), dtype)


def test_count_nonfinite_merged_sees_overflow_and_leaves_w(rng):
    W, A, B = ref.random_lora(rng, 9, 12, 2, np.float32)
    A[0, 2] = 3e38  # finite, but 2 * 3e38 overflows float32
    B[:] = 1.0
    before = W.copy()
    assert kernels.count_nonfinite_merged(W, A, B, 2.0) == 9  # column 2, every row
    ref.assert_bitwise_equal(W, before)


@given(st.data())
def test_count_nonfinite_predicts_the_merge_exactly(data):
    # At the edge of overflow the rounding decides; the count must match the
    # merge element for element, no more (no guard band), no less.
    dtype = data.draw(st.sampled_from(ref.DTYPES))
    big = float(np.finfo(dtype).max)
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    rank = data.draw(st.integers(1, 6))
    W = (rng.uniform(-1, 1, (5, 7)) * big * data.draw(st.sampled_from([0.0, 0.5, 0.99]))).astype(dtype)
    A = rng.uniform(-1, 1, (rank, 7)).astype(dtype)
    B = (rng.uniform(-1, 1, (5, rank)) * big / rank).astype(dtype)
    scaling = data.draw(st.sampled_from([0.5, 1.0, 1.0 - 2.0**-20, 1.0 + 2.0**-20, 2.0]))
    predicted = kernels.count_nonfinite_merged(W, A, B, scaling)
    merged = W.copy()
    kernels.merge(merged, A, B, scaling)
    assert predicted == np.count_nonzero(~np.isfinite(merged))
    # And for a replacement while merged: unmerge (A, B), merge (A2, B2).
    A2 = rng.uniform(-1, 1, (rank, 7)).astype(dtype)
    B2 = (rng.uniform(-1, 1, (5, rank)) * big / rank).astype(dtype)
    predicted = kernels.count_nonfinite_remerged(merged, A, B, A2, B2, scaling)
    replaced = merged.copy()
    kernels.unmerge(replaced, A, B, scaling)
    kernels.merge(replaced, A2, B2, scaling)
    assert predicted == np.count_nonzero(~np.isfinite(replaced))


@pytest.mark.parametrize(
    "call",
    [
        lambda W, A, B: kernels.forward(W, A, B, 1.0, np.ones(W.shape[1] + 1, W.dtype),
                                        np.empty(W.shape[0], W.dtype)),
        lambda W, A, B: kernels.forward(W, A, B, 1.0, np.ones(W.shape[1], W.dtype),
                                        np.empty(W.shape[0] - 1, W.dtype)),
        lambda W, A, B: kernels.forward_batch(W, A, B, 1.0, np.ones((2, W.shape[1]), W.dtype),
                                              np.empty((3, W.shape[0]), W.dtype)),
        lambda W, A, B: kernels.merge(W, A[:, :-1].copy(), B, 1.0),
        lambda W, A, B: kernels.unmerge(W, A, B[:-1].copy(), 1.0),
        lambda W, A, B: kernels.merge(W, A[:-1].copy(), B, 1.0),
        lambda W, A, B: kernels.merge(W, np.asfortranarray(A), B, 1.0),
        lambda W, A, B: kernels.forward_batch(W, A, B, 1.0, np.ones((W.shape[1], 3), W.dtype).T,
                                              np.empty((3, W.shape[0]), W.dtype)),
    ],
    ids=["x-length", "out-length", "out-batch", "A-in", "B-out", "rank", "A-order", "X-order"],
)
def test_kernels_reject_inconsistent_shapes(call, rng):
    W, A, B = ref.random_lora(rng, 6, 5, 2, np.float64)
    before = W.copy()
    with pytest.raises(LoraShapeError):
        call(W, A, B)
    ref.assert_bitwise_equal(W, before)


@njit
def user_count_remerged(W, A, B, A2, B2, scaling):
    return kernels.count_nonfinite_remerged(W, A, B, A2, B2, scaling)


@njit
def user_group_rows(ids, n):
    return kernels.group_rows(ids, n)


def test_count_remerged_and_group_rows_from_user_njit(dtype, rng):
    W, A, B = ref.random_lora(rng, 9, 6, 2, dtype)
    A2 = A.copy()
    A2[1, 3] = np.finfo(dtype).max
    B2 = np.ones_like(B)
    assert user_count_remerged(W, A, B, A, B, 0.5) == 0
    assert user_count_remerged(W, A, B, A2, B2, 4.0) == 9
    order, starts = user_group_rows(np.array([1, -1, 0, 1], np.int64), 2)
    assert order.tolist() == [2, 0, 3] and starts.tolist() == [0, 1, 3]


@njit
def user_forward_mixed(W, A, B, x):
    out = np.empty(W.shape[0], dtype=np.float32)
    return kernels.forward(W, A, B, 1.0, x, out)


def test_wrong_types_from_user_njit_raise_when_run(rng):
    # The guard compiles inside the user's function too: a clear error when
    # it runs, never a read past an array.
    W, A, B = ref.random_lora(rng, 5, 4, 2, np.float64)
    with pytest.raises(LoraDtypeError, match="out float32"):
        user_forward_mixed(W, A, B, np.ones(4))
    with pytest.raises(LoraShapeError, match="x must be 1-D"):
        user_forward_mixed(W.astype(np.float32), A.astype(np.float32), B.astype(np.float32),
                           np.ones((2, 4), np.float32))


@njit
def user_forward_stacked(WA, B, scaling, x):
    out = np.empty(B.shape[0], dtype=WA.dtype)
    return kernels.forward_stacked(WA, B, scaling, x, out)


@njit
def user_forward_batch_stacked(WA, B, scaling, X):
    out = np.empty((X.shape[0], B.shape[0]), dtype=WA.dtype)
    return kernels.forward_batch_stacked(WA, B, scaling, X, out)


@given(case=lora_case(), batch=st.integers(0, 9), scaling=st.sampled_from([0.0, -1.5, 2.0]))
def test_stacked_kernels_match_reference(case, batch, scaling):
    out_features, in_features, rank, dtype, _, seed = case
    rng = np.random.default_rng(seed)
    W, A, B = ref.random_lora(rng, out_features, in_features, rank, dtype)
    WA = np.vstack([W, A])
    x = rng.standard_normal(W.shape[1]).astype(W.dtype)
    X = rng.standard_normal((batch, W.shape[1])).astype(W.dtype)
    y = user_forward_stacked(WA, B, scaling, x)
    ref.assert_close(y, *ref.forward(W, A, B, scaling, x), W.dtype)
    Y = user_forward_batch_stacked(WA, B, scaling, X)
    ref.assert_close(Y, *ref.forward(W, A, B, scaling, X), W.dtype)
    out = np.empty(W.shape[0], W.dtype)
    ref.assert_close(kernels.forward_stacked(WA, B, scaling, x, out),
                     *ref.forward(W, A, B, scaling, x), W.dtype)


def test_stacked_kernels_reject_shapes(rng):
    W, A, B = ref.random_lora(rng, 6, 5, 2, np.float64)
    WA = np.vstack([W, A])
    with pytest.raises(LoraShapeError):
        kernels.forward_stacked(WA, B[:-1].copy(), 1.0, np.ones(5), np.empty(6))
    with pytest.raises(LoraShapeError):
        kernels.forward_stacked(WA, B, 1.0, np.ones(4), np.empty(6))
    with pytest.raises(LoraShapeError):
        kernels.forward_batch_stacked(WA, B, 1.0, np.ones((2, 5)), np.empty((3, 6)))
    with pytest.raises(LoraShapeError):
        kernels.forward_stacked(WA[:3], np.ones((1, 9)), 1.0, np.ones(5), np.empty(6))


@njit(fastmath=True)
def _user_fastmath_merge(W, A, B, scaling):
    kernels.merge(W, A, B, scaling)
    kernels.unmerge_serial(W, A, B, scaling)
    kernels.merge_serial(W, A, B, scaling)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_kernels_keep_their_rounding_inside_a_fastmath_caller(dtype):
    # A function compiled without a fastmath option takes its caller's flags;
    # EXACT_OPTIONS spells out fastmath=False so the merge stays exact.
    rng = np.random.default_rng(7)
    W = rng.standard_normal((24, 40)).astype(dtype)
    A = rng.standard_normal((8, 40)).astype(dtype)
    B = rng.standard_normal((24, 8)).astype(dtype)
    merged = ref.merged_exact(W, A, B, 0.37, +1)
    expected = ref.merged_exact(ref.merged_exact(merged, A, B, 0.37, -1), A, B, 0.37, +1)
    got = W.copy()
    _user_fastmath_merge(got, A, B, 0.37)
    ref.assert_bitwise_equal(got, expected)


@pytest.mark.parametrize("batch", [1, 2, 3, 5])
def test_stacked_kernels_apply_the_scaling_as_blas_does(batch):
    # The low-rank term is scaled after its sum, by the scaling rounded once
    # to the dtype (as BLAS takes alpha): a scaling that rounds to 0 in
    # float32 skips the term, and a huge one does not overflow t first.
    rng = np.random.default_rng(batch)
    W, A, B = ref.random_lora(rng, 7, 5, 3, np.float32)
    WA = np.vstack([W, A])
    X = rng.standard_normal((batch, 5)).astype(np.float32)
    out = np.empty((batch, 7), np.float32)
    B_inf = B.copy()
    B_inf[0, 0] = np.inf
    got = kernels.forward_batch_stacked(WA, B_inf, 5e-324, X, out)
    assert np.isfinite(got).all()
    ref.assert_close(got, *ref.forward(W, A, B, 0.0, X), np.float32)
    got = kernels.forward_stacked(WA, B_inf, 5e-324, X[0], out[0])
    assert np.isfinite(got).all()
    ref.assert_close(got, *ref.forward(W, A, B, 0.0, X[0]), np.float32)
    huge, tiny = 1e38, np.float32(1e-30)
    Bt = (B * tiny).astype(np.float32)
    got = kernels.forward_batch_stacked(WA, Bt, huge, X, out)
    assert np.isfinite(got).all()
    ref.assert_close(got, *ref.forward(W, A, Bt, np.float32(huge), X), np.float32)
