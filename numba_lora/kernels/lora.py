"""Kernels for one adapter over one weight: forward, batched forward, merge, unmerge.

The contract they share is in :mod:`numba_lora.kernels`.
"""

import numpy as np
from numba import njit, prange

from ._blas import gemm_nn, gemm_nt, gemv_n
from .._config import JIT_OPTIONS, STRICT_OPTIONS

__all__ = [
    "forward",
    "forward_batch",
    "merge",
    "unmerge",
    "merge_serial",
    "unmerge_serial",
    "count_nonfinite_merged",
]

# Rows of W handled by one task of the merge loop, and columns per tile of
# the delta accumulator.  They fix the blocking, which depends on the shape
# only, never on the thread count.  Measured on 4096 x 4096 float32, rank 16:
# tiles of 2048 beat 256..1024 (fewer slice set-ups per row) and 4096.
ROW_BLOCK = 4
COL_TILE = 2048

#: Highest rank merged by one BLAS gemm.  BLAS splits the sum over ``k``
#: into panels (OpenBLAS: a few hundred long) and would round W once per
#: panel, so longer ranks go through the tiled kernel, which rounds once.
BLAS_MERGE_MAX_RANK = 128

#: ``count_nonfinite_merged`` flags elements within this relative distance
#: of the dtype's largest value: there the rounding of the sum decides.
OVERFLOW_GUARD = 2.0**-10


@njit(**JIT_OPTIONS)
def _check_lora_shapes(W, A, B):
    out_features, in_features = W.shape
    if A.shape[1] != in_features:
        raise ValueError("A must be (rank, in_features): A.shape[1] != W.shape[1]")
    if B.shape[0] != out_features:
        raise ValueError("B must be (out_features, rank): B.shape[0] != W.shape[0]")
    if B.shape[1] != A.shape[0]:
        raise ValueError("rank mismatch: B.shape[1] != A.shape[0]")
    if not (W.flags.c_contiguous and A.flags.c_contiguous and B.flags.c_contiguous):
        raise ValueError("W, A and B must be C-contiguous")


@njit(**JIT_OPTIONS)
def forward(W, A, B, scaling, x, out):
    """One input vector: ``out = W @ x + scaling * B @ (A @ x)``.

    Parameters
    ----------
    W : ndarray, shape (out_features, in_features)
        Frozen base weight.
    A : ndarray, shape (rank, in_features)
        LoRA down-projection.
    B : ndarray, shape (out_features, rank)
        LoRA up-projection.
    scaling : float
        Multiplier of the low-rank term (``alpha / rank`` for plain LoRA);
        ``0`` skips it.
    x : ndarray, shape (in_features,)
        Input vector, contiguous.
    out : ndarray, shape (out_features,)
        Output, contiguous and writable; overwritten.

    Returns
    -------
    out : ndarray, shape (out_features,)
        The same array as ``out``.
    """
    _check_lora_shapes(W, A, B)
    if x.shape[0] != W.shape[1] or out.shape[0] != W.shape[0]:
        raise ValueError("x must be (in_features,) and out (out_features,)")
    if not (x.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError("x and out must be contiguous")
    if scaling != 0 and A.shape[0] > 0:
        t = np.empty(A.shape[0], dtype=out.dtype)
        gemv_n(1.0, A, x, 0.0, t)
        # The small term goes in first so that the big product accumulates
        # onto it (beta = 1) in the same pass that writes out.
        gemv_n(scaling, B, t, 0.0, out)
        gemv_n(1.0, W, x, 1.0, out)
    else:
        gemv_n(1.0, W, x, 0.0, out)
    return out


@njit(**JIT_OPTIONS)
def forward_batch(W, A, B, scaling, X, out):
    """A batch of rows: ``out = X @ W.T + scaling * (X @ A.T) @ B.T``.

    Parameters
    ----------
    W : ndarray, shape (out_features, in_features)
        Frozen base weight.
    A : ndarray, shape (rank, in_features)
        LoRA down-projection.
    B : ndarray, shape (out_features, rank)
        LoRA up-projection.
    scaling : float
        Multiplier of the low-rank term; ``0`` skips it.
    X : ndarray, shape (batch, in_features)
        Input rows, C-contiguous; ``batch`` may be 0.
    out : ndarray, shape (batch, out_features)
        Output, C-contiguous and writable; overwritten.

    Returns
    -------
    out : ndarray, shape (batch, out_features)
        The same array as ``out``.
    """
    _check_lora_shapes(W, A, B)
    batch = X.shape[0]
    if X.shape[1] != W.shape[1] or out.shape[0] != batch or out.shape[1] != W.shape[0]:
        raise ValueError("X must be (batch, in_features) and out (batch, out_features)")
    if not (X.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError("X and out must be C-contiguous")
    if batch == 0:
        return out
    gemm_nt(1.0, X, W, 0.0, out)
    if scaling != 0 and A.shape[0] > 0:
        T = np.empty((batch, A.shape[0]), dtype=out.dtype)
        gemm_nt(1.0, X, A, 0.0, T)
        # beta = 1: the low-rank term is added straight into out, with no
        # (batch, out_features) temporary.
        gemm_nt(scaling, T, B, 1.0, out)
    return out


@njit(**JIT_OPTIONS)
def _row_delta(A, c, j0, width, acc):
    """acc[:width] = sum_k c[k] * A[k, j0:j0+width], k taken four at a time.

    Four rows of A per pass over acc quarter the accumulator's loads and
    stores, which otherwise bound the loop.  The order of the sum is fixed by
    the rank alone.
    """
    rank = A.shape[0]
    a = acc[:width]
    k = 0
    while k < rank:
        if k + 4 <= rank:
            A0 = A[k, j0:j0 + width]
            A1 = A[k + 1, j0:j0 + width]
            A2 = A[k + 2, j0:j0 + width]
            A3 = A[k + 3, j0:j0 + width]
            c0, c1, c2, c3 = c[k], c[k + 1], c[k + 2], c[k + 3]
            if k == 0:
                for j in range(width):
                    a[j] = (c0 * A0[j] + c1 * A1[j]) + (c2 * A2[j] + c3 * A3[j])
            else:
                for j in range(width):
                    a[j] += (c0 * A0[j] + c1 * A1[j]) + (c2 * A2[j] + c3 * A3[j])
            k += 4
        else:
            Ak = A[k, j0:j0 + width]
            ck = c[k]
            if k == 0:
                for j in range(width):
                    a[j] = ck * Ak[j]
            else:
                for j in range(width):
                    a[j] += ck * Ak[j]
            k += 1


@njit(**JIT_OPTIONS)
def _scaled_row(B, i, s, c):
    for k in range(B.shape[1]):
        c[k] = s * B[i, k]


@njit(**JIT_OPTIONS)
def _n_row_blocks(W):
    return (W.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK


@njit(**JIT_OPTIONS)
def _update_row_block(W, A, B, scaling, ib, subtract):
    """Add (or subtract) the delta to the rows of block ``ib`` of W, tile by tile."""
    out_features, in_features = W.shape
    s = W.dtype.type(scaling)
    acc = np.empty(min(COL_TILE, in_features), dtype=W.dtype)
    c = np.empty(A.shape[0], dtype=W.dtype)
    for i in range(ib * ROW_BLOCK, min(out_features, (ib + 1) * ROW_BLOCK)):
        _scaled_row(B, i, s, c)
        for j0 in range(0, in_features, COL_TILE):
            width = min(COL_TILE, in_features - j0)
            _row_delta(A, c, j0, width, acc)
            Wt = W[i, j0:j0 + width]
            if subtract:
                for j in range(width):
                    Wt[j] -= acc[j]
            else:
                for j in range(width):
                    Wt[j] += acc[j]


@njit(**STRICT_OPTIONS)
def _count_unsafe_row_block(W, A, B, scaling, ib, limit):
    """Elements of rows of block ``ib`` whose merged value is NaN, inf or beyond ``limit``.

    The merged value is computed in float64, whatever W's dtype.
    """
    out_features, in_features = W.shape
    acc = np.empty(min(COL_TILE, in_features), dtype=np.float64)
    c = np.empty(A.shape[0], dtype=np.float64)
    count = 0
    for i in range(ib * ROW_BLOCK, min(out_features, (ib + 1) * ROW_BLOCK)):
        _scaled_row(B, i, np.float64(scaling), c)
        for j0 in range(0, in_features, COL_TILE):
            width = min(COL_TILE, in_features - j0)
            _row_delta(A, c, j0, width, acc)
            Wt = W[i, j0:j0 + width]
            for j in range(width):
                # Written so that NaN fails the test too.
                if not (abs(np.float64(Wt[j]) + acc[j]) <= limit):
                    count += 1
    return count


@njit(parallel=True, **JIT_OPTIONS)
def _tiled_update(W, A, B, scaling, subtract):
    for ib in prange(_n_row_blocks(W)):
        _update_row_block(W, A, B, scaling, ib, subtract)


@njit(**JIT_OPTIONS)
def merge(W, A, B, scaling):
    """In place, ``W += scaling * B @ A``, without a W-sized temporary.

    Parameters
    ----------
    W : ndarray, shape (out_features, in_features)
        Weight to update, C-contiguous and writable.
    A : ndarray, shape (rank, in_features)
        LoRA down-projection.
    B : ndarray, shape (out_features, rank)
        LoRA up-projection.
    scaling : float
        Multiplier of the low-rank term.

    Notes
    -----
    One BLAS gemm with ``beta = 1`` (rank <= ``BLAS_MERGE_MAX_RANK``), else
    the tiled kernel on Numba's threads.  Either way each element of W is
    rounded once and :func:`unmerge` subtracts bitwise the same delta.
    """
    _check_lora_shapes(W, A, B)
    if A.shape[0] <= BLAS_MERGE_MAX_RANK:
        gemm_nn(scaling, B, A, 1.0, W)
    else:
        _tiled_update(W, A, B, scaling, False)


@njit(**JIT_OPTIONS)
def unmerge(W, A, B, scaling):
    """In place, ``W -= scaling * B @ A``: the exact inverse step of :func:`merge`.

    The delta subtracted is bitwise the delta :func:`merge` adds (with the
    same BLAS thread count).  Parameters as for :func:`merge`.
    """
    _check_lora_shapes(W, A, B)
    if A.shape[0] <= BLAS_MERGE_MAX_RANK:
        gemm_nn(-scaling, B, A, 1.0, W)
    else:
        _tiled_update(W, A, B, scaling, True)


@njit(**JIT_OPTIONS)
def merge_serial(W, A, B, scaling):
    """``W += scaling * B @ A`` on the calling thread only, for a caller's ``prange``.

    Tiled, no BLAS, no threads; the delta is rounded differently from
    :func:`merge`'s, so undo it with :func:`unmerge_serial`.
    """
    _check_lora_shapes(W, A, B)
    for ib in range(_n_row_blocks(W)):
        _update_row_block(W, A, B, scaling, ib, False)


@njit(**JIT_OPTIONS)
def unmerge_serial(W, A, B, scaling):
    """``W -= scaling * B @ A`` on the calling thread: the exact inverse of :func:`merge_serial`."""
    _check_lora_shapes(W, A, B)
    for ib in range(_n_row_blocks(W)):
        _update_row_block(W, A, B, scaling, ib, True)


@njit(parallel=True, **STRICT_OPTIONS)
def count_nonfinite_merged(W, A, B, scaling):
    """How many elements of ``W + scaling * B @ A`` would be NaN, infinite, or nearly so.

    Reads W and writes nothing.  The merged values are computed in float64;
    an element counts when it is NaN or infinite or its magnitude is within
    a relative ``OVERFLOW_GUARD`` (2**-10) of the largest finite value of
    W's dtype, where the rounding of the sum decides whether it overflows.
    So a merge that this counts 0 for leaves every element finite, and one
    it counts more for may be refused with W untouched.
    ``LoraLinear.merge(check_finite=True)`` relies on that.

    Returns
    -------
    count : int
        Elements counted (elements already non-finite in W count too).
    """
    _check_lora_shapes(W, A, B)
    limit = np.float64(np.finfo(W.dtype).max) * (1.0 - OVERFLOW_GUARD)
    count = 0
    for ib in prange(_n_row_blocks(W)):
        count += _count_unsafe_row_block(W, A, B, scaling, ib, limit)
    return count
