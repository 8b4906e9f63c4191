"""Numba kernels for LoRA: the arithmetic behind :class:`numba_lora.LoraLinear`.

Every function here is an ``@njit`` function that takes plain arrays and
scalars, so it can be called from Python and from a user's own ``@njit``
code alike::

    from numba import njit
    from numba_lora import kernels

    @njit
    def my_layer(W, A, B, scaling, x):
        out = np.empty(W.shape[0], dtype=W.dtype)
        return kernels.forward(W, A, B, scaling, x, out)

Contract shared by all kernels
------------------------------
- ``W`` is ``(out_features, in_features)``, ``A`` is ``(rank, in_features)``,
  ``B`` is ``(out_features, rank)``; inputs and outputs follow from those.
- All arrays share one dtype, ``float32`` or ``float64``, and are
  C-contiguous; ``scaling`` is a Python or NumPy float.
- The kernels check shapes and contiguity (it is free) and raise
  ``ValueError`` when they disagree; they do not check values, dtype
  agreement beyond what Numba's typing enforces, or aliasing between inputs
  and outputs (``out`` must not overlap any input).
- The low-rank term is skipped when ``scaling == 0``, so ``scaling=0`` gives
  the plain dense product ``W @ x``.

Threads
-------
``forward`` and ``forward_batch`` are BLAS calls (SciPy's BLAS, through the
wrappers Numba ships) and run on BLAS's threads; ``merge``, ``unmerge`` and
``count_nonfinite_merged`` run on Numba's threads (``numba.set_num_threads``).
``merge_serial`` and ``unmerge_serial`` use no threads and are meant for a
caller's own ``prange`` loop; do not call the BLAS-backed kernels inside a
``prange`` body (BLAS threads times Numba threads oversubscribe the cores).

Numerical behaviour of merge
----------------------------
The delta ``scaling * B @ A`` is computed block by block, for each element
as ``sum_k (scaling * B[i, k]) * A[k, j]`` in the arrays' dtype, in a fixed
order over ``k``, and then added to ``W`` once.  Blocks are fixed by shape,
not by thread count, so the result is bitwise independent of the number of
threads, and ``merge`` and ``unmerge`` subtract exactly what was added:
merge-then-unmerge returns each element to within one rounding of where it
started, and further cycles reproduce the first cycle's result bit for bit.
"""

import numpy as np
from numba import njit, prange

from ._blas import gemm_nt, gemv_n
from ._config import JIT_OPTIONS, STRICT_OPTIONS

__all__ = [
    "forward",
    "forward_batch",
    "merge",
    "unmerge",
    "merge_serial",
    "unmerge_serial",
    "count_nonfinite_merged",
]

# Rows of W handled by one task of the merge loop, and columns per tile; the
# accumulator tile (ROW_BLOCK x COL_TILE) stays in L1 while A's tile stays in
# L2.  They fix the blocking, so they must not depend on the thread count.
ROW_BLOCK = 4
COL_TILE = 512


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
def _delta_tile(A, B, s, i0, rows, j0, width, acc):
    """acc[:rows, :width] = (s * B[i0:i0+rows]) @ A[:, j0:j0+width], fixed k order."""
    rank = A.shape[0]
    zero = acc.dtype.type(0)
    for ii in range(rows):
        for j in range(width):
            acc[ii, j] = zero
    for k in range(rank):
        for ii in range(rows):
            sb = s * B[i0 + ii, k]
            for j in range(width):
                acc[ii, j] += sb * A[k, j0 + j]


@njit(**JIT_OPTIONS)
def _n_row_blocks(W):
    return (W.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK


@njit(**JIT_OPTIONS)
def _update_row_block(W, A, B, scaling, ib, subtract):
    """Add (or subtract) the delta to rows of block ``ib`` of W, tile by tile."""
    out_features, in_features = W.shape
    s = W.dtype.type(scaling)
    i0 = ib * ROW_BLOCK
    rows = min(ROW_BLOCK, out_features - i0)
    acc = np.empty((ROW_BLOCK, COL_TILE), dtype=W.dtype)
    for j0 in range(0, in_features, COL_TILE):
        width = min(COL_TILE, in_features - j0)
        _delta_tile(A, B, s, i0, rows, j0, width, acc)
        if subtract:
            for ii in range(rows):
                for j in range(width):
                    W[i0 + ii, j0 + j] -= acc[ii, j]
        else:
            for ii in range(rows):
                for j in range(width):
                    W[i0 + ii, j0 + j] += acc[ii, j]


@njit(**STRICT_OPTIONS)
def _count_nonfinite_row_block(W, A, B, scaling, ib):
    out_features, in_features = W.shape
    s = W.dtype.type(scaling)
    i0 = ib * ROW_BLOCK
    rows = min(ROW_BLOCK, out_features - i0)
    acc = np.empty((ROW_BLOCK, COL_TILE), dtype=W.dtype)
    count = 0
    for j0 in range(0, in_features, COL_TILE):
        width = min(COL_TILE, in_features - j0)
        _delta_tile(A, B, s, i0, rows, j0, width, acc)
        for ii in range(rows):
            for j in range(width):
                if not np.isfinite(W[i0 + ii, j0 + j] + acc[ii, j]):
                    count += 1
    return count


@njit(parallel=True, **JIT_OPTIONS)
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
    Runs on Numba's threads; the result does not depend on how many.  Extra
    memory is one ``(ROW_BLOCK, COL_TILE)`` tile per task.
    """
    _check_lora_shapes(W, A, B)
    for ib in prange(_n_row_blocks(W)):
        _update_row_block(W, A, B, scaling, ib, False)


@njit(parallel=True, **JIT_OPTIONS)
def unmerge(W, A, B, scaling):
    """In place, ``W -= scaling * B @ A``: the exact inverse step of :func:`merge`.

    The delta subtracted is bitwise the delta :func:`merge` adds.  Parameters
    as for :func:`merge`.
    """
    _check_lora_shapes(W, A, B)
    for ib in prange(_n_row_blocks(W)):
        _update_row_block(W, A, B, scaling, ib, True)


@njit(**JIT_OPTIONS)
def merge_serial(W, A, B, scaling):
    """:func:`merge` on the calling thread only, for use inside a ``prange``.

    Bitwise the same result as :func:`merge`.
    """
    _check_lora_shapes(W, A, B)
    for ib in range(_n_row_blocks(W)):
        _update_row_block(W, A, B, scaling, ib, False)


@njit(**JIT_OPTIONS)
def unmerge_serial(W, A, B, scaling):
    """:func:`unmerge` on the calling thread only, for use inside a ``prange``.

    Bitwise the same result as :func:`unmerge`.
    """
    _check_lora_shapes(W, A, B)
    for ib in range(_n_row_blocks(W)):
        _update_row_block(W, A, B, scaling, ib, True)


@njit(parallel=True, **STRICT_OPTIONS)
def count_nonfinite_merged(W, A, B, scaling):
    """How many elements of ``W + scaling * B @ A`` would be NaN or infinite.

    Reads W and writes nothing; the values tested are bitwise those
    :func:`merge` would store.  Used by ``LoraLinear.merge(check_finite=True)``
    to refuse a merge before touching W.

    Returns
    -------
    count : int
        Number of non-finite elements the merge would produce (elements
        already non-finite in W count too).
    """
    _check_lora_shapes(W, A, B)
    count = 0
    for ib in prange(_n_row_blocks(W)):
        count += _count_nonfinite_row_block(W, A, B, scaling, ib)
    return count
