"""Kernels for one adapter over one weight: forward, batched forward, merge, unmerge.

The contract they share is in :mod:`numba_lora.kernels`.  Each public kernel
is a one-line ``@njit`` function over a guarded body (``_guard``): wrong
argument types are refused when the call is compiled, shapes and
contiguity when it runs, before any array is touched.
"""

import numpy as np
from numba import njit, prange

from .._config import EXACT_OPTIONS, JIT_OPTIONS
from ..errors import LoraShapeError
from ._blas import gemm_nt, gemv_n
from ._guard import (BLOCK_BYTES, BLOCK_ROWS, fma, fma_block4, guarded, prefetch, prefetch_read,
                     quiet)

__all__ = [
    "forward",
    "forward_batch",
    "forward_stacked",
    "forward_batch_stacked",
    "merge",
    "unmerge",
    "merge_serial",
    "unmerge_serial",
    "count_nonfinite_merged",
    "count_nonfinite_remerged",
]

# Rows of W per task of the parallel merge loop, and columns per tile of the
# delta accumulator (4 KiB in float32: it stays in L1 while the rank's rows
# of A stream through it).  They fix the blocking, never the order of any
# sum: each element's arithmetic is the same whatever the tiles and threads.
ROW_BLOCK = 8
COL_TILE = 1024

_ADD, _SUBTRACT = 0, 1

_LORA = (("W", "f2"), ("A", "f2"), ("B", "f2"), ("scaling", "real"))
_LORA_W = (("W", "f2w"), ("A", "f2"), ("B", "f2"), ("scaling", "real"))


@njit(**JIT_OPTIONS)
def _check_lora_shapes(W, A, B):
    out_features, in_features = W.shape
    if A.shape[1] != in_features:
        raise LoraShapeError("A must be (rank, in_features): A.shape[1] != W.shape[1]")
    if B.shape[0] != out_features:
        raise LoraShapeError("B must be (out_features, rank): B.shape[0] != W.shape[0]")
    if B.shape[1] != A.shape[0]:
        raise LoraShapeError("rank mismatch: B.shape[1] != A.shape[0]")
    if not (W.flags.c_contiguous and A.flags.c_contiguous and B.flags.c_contiguous):
        raise LoraShapeError("W, A and B must be C-contiguous")


# ----------------------------------------------------------------- forward
@njit(**JIT_OPTIONS)
def _forward(W, A, B, scaling, x, out):
    _check_lora_shapes(W, A, B)
    if x.shape[0] != W.shape[1] or out.shape[0] != W.shape[0]:
        raise LoraShapeError("x must be (in_features,) and out (out_features,)")
    if not (x.flags.c_contiguous and out.flags.c_contiguous):
        raise LoraShapeError("x and out must be contiguous")
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


_forward_checked = guarded("forward", _LORA + (("x", "f1"), ("out", "f1w")), _forward)


@njit(**JIT_OPTIONS)
def forward(W, A, B, scaling, x, out):
    """One input vector: ``out = W @ x + scaling * B @ (A @ x)``.

    Three BLAS matrix-vector products (``t = A x``, ``out = s B t``, then
    ``out += W x``) on the BLAS NumPy uses; the only temporary is ``t``, of
    length ``rank``.  ``scaling == 0`` (or rank 0) gives the plain ``W @ x``.

    Parameters
    ----------
    W : ndarray, shape (out_features, in_features)
        Frozen base weight, C-contiguous.
    A : ndarray, shape (rank, in_features)
        LoRA down-projection, C-contiguous.
    B : ndarray, shape (out_features, rank)
        LoRA up-projection, C-contiguous.
    scaling : float
        Multiplier of the low-rank term (``alpha / rank`` for plain LoRA).
        ``0`` skips the low-rank term.
    x : ndarray, shape (in_features,)
        Input vector, contiguous.
    out : ndarray, shape (out_features,)
        Output, contiguous and writable; overwritten.

    Returns
    -------
    out : ndarray, shape (out_features,)
        The same array as ``out``.

    Raises
    ------
    LoraTypeError, LoraDtypeError, LoraShapeError
        When the call is compiled: an argument is not an array, or has the
        wrong number of dimensions, the float arrays do not share one dtype
        (float32 or float64), or the output is read-only.  The message names
        the kernel and the argument.
    LoraShapeError
        When it runs: the shapes do not fit together, or an array is not
        C-contiguous.  Nothing has been written then.

    See Also
    --------
    forward_batch : Many rows at once.
    forward_stacked : The same with W and A stacked in one array.
    numba_lora.LoraLinear.forward : The layer that calls this kernel.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((6, 4))                  # (out_features, in_features)
    >>> A = rng.standard_normal((2, 4))                  # (rank, in_features)
    >>> B = rng.standard_normal((6, 2))                  # (out_features, rank)
    >>> x = rng.standard_normal(4)
    >>> out = kernels.forward(W, A, B, 0.5, x, np.empty(6))
    >>> np.allclose(out, W @ x + 0.5 * B @ (A @ x))
    True
    """
    return _forward_checked(W, A, B, scaling, x, out)


@njit(**JIT_OPTIONS)
def _forward_batch(W, A, B, scaling, X, out):
    _check_lora_shapes(W, A, B)
    batch = X.shape[0]
    if X.shape[1] != W.shape[1] or out.shape[0] != batch or out.shape[1] != W.shape[0]:
        raise LoraShapeError("X must be (batch, in_features) and out (batch, out_features)")
    if not (X.flags.c_contiguous and out.flags.c_contiguous):
        raise LoraShapeError("X and out must be C-contiguous")
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


_forward_batch_checked = guarded("forward_batch", _LORA + (("X", "f2"), ("out", "f2w")),
                                 _forward_batch)
_forward_batch_quiet = quiet(_forward_batch_checked)


@njit(**JIT_OPTIONS)
def forward_batch(W, A, B, scaling, X, out):
    """A batch of rows: ``out = X @ W.T + scaling * (X @ A.T) @ B.T``.

    Three BLAS matrix products; the low-rank term is added straight into
    ``out`` (``beta = 1``), so the only temporary is ``X @ A.T``, of shape
    (batch, rank).

    Parameters
    ----------
    W : ndarray, shape (out_features, in_features)
        Frozen base weight, C-contiguous.
    A : ndarray, shape (rank, in_features)
        LoRA down-projection, C-contiguous.
    B : ndarray, shape (out_features, rank)
        LoRA up-projection, C-contiguous.
    scaling : float
        Multiplier of the low-rank term (``alpha / rank`` for plain LoRA).
        ``0`` skips the low-rank term.
    X : ndarray, shape (batch, in_features)
        Input rows, C-contiguous; ``batch`` may be 0.
    out : ndarray, shape (batch, out_features)
        Output, C-contiguous and writable; overwritten.

    Returns
    -------
    out : ndarray, shape (batch, out_features)
        The same array as ``out``.

    Raises
    ------
    LoraTypeError, LoraDtypeError, LoraShapeError
        When the call is compiled: an argument is not an array, or has the
        wrong number of dimensions, the float arrays do not share one dtype
        (float32 or float64), or the output is read-only.  The message names
        the kernel and the argument.
    LoraShapeError
        When it runs: the shapes do not fit together, or an array is not
        C-contiguous.  Nothing has been written then.

    See Also
    --------
    forward : One vector.
    forward_batch_stacked : A few rows, W and A read in one pass.
    forward_batch_multi : A different adapter for each row.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((6, 4))                  # (out_features, in_features)
    >>> A = rng.standard_normal((2, 4))                  # (rank, in_features)
    >>> B = rng.standard_normal((6, 2))                  # (out_features, rank)
    >>> X = rng.standard_normal((3, 4))
    >>> out = kernels.forward_batch(W, A, B, 0.5, X, np.empty((3, 6)))
    >>> np.allclose(out, X @ W.T + 0.5 * (X @ A.T) @ B.T)
    True
    """
    return _forward_batch_checked(W, A, B, scaling, X, out)


# ------------------------------------------- forward over a stacked [W; A]
@njit(**JIT_OPTIONS)
def _check_stacked(WA, B):
    rank = B.shape[1]
    if rank < 0 or rank > WA.shape[0]:
        raise LoraShapeError("WA must be (out_features + rank, in_features) with rank = B.shape[1]")
    if B.shape[0] != WA.shape[0] - rank:
        raise LoraShapeError("B must be (out_features, rank): B.shape[0] != WA.shape[0] - rank")
    if not (WA.flags.c_contiguous and B.flags.c_contiguous):
        raise LoraShapeError("WA and B must be C-contiguous")
    return WA.shape[0] - rank, rank


#: How far ahead of the row it is at, :func:`_low_rank_rows` asks for B's cache lines.
LOW_RANK_PREFETCH_BYTES = 16384


@njit(**JIT_OPTIONS)
def _low_rank_rows(y, t, B, s, out, r0, r1):
    """``out[o] = y[o] + s * (B[o] . t)`` for ``r0 <= o < r1``; ``s`` of out's dtype.

    ``y`` may be ``out`` itself: each element is read before it is written.
    """
    rank = B.shape[1]
    zero = out.dtype.type(0)
    # B comes from memory: the product before this pass streamed W through
    # the caches.  One thread's hardware prefetcher alone reads it at about
    # half the speed of asking for its lines a fixed distance ahead
    # (measured at 4096 x 16 float32 right after the gemv over [W; A]:
    # 15-20 us against 10-12 us, the gemv taking 1-1.3 ms).  Only hints:
    # a prefetch never faults, and none is asked past row r1.
    row_bytes = rank * B.itemsize
    base = np.int64(B.ctypes.data)  # signed: uintp + int would type as a float
    end = base + r1 * row_bytes
    ahead = base + r0 * row_bytes
    o = r0
    while o < r1:
        stop = min(o + 4, r1)
        limit = min(base + stop * row_bytes + LOW_RANK_PREFETCH_BYTES, end)
        while ahead < limit:
            prefetch_read(ahead)
            ahead += 64
        if stop - o == 4:
            # Four rows at a time: four independent sums in flight.
            a0 = zero
            a1 = zero
            a2 = zero
            a3 = zero
            for q in range(rank):
                tq = t[q]
                a0 += B[o, q] * tq
                a1 += B[o + 1, q] * tq
                a2 += B[o + 2, q] * tq
                a3 += B[o + 3, q] * tq
            # Scaled after the sum, as BLAS applies alpha: scaling the
            # factors first could overflow where the product does not.
            out[o] = y[o] + s * a0
            out[o + 1] = y[o + 1] + s * a1
            out[o + 2] = y[o + 2] + s * a2
            out[o + 3] = y[o + 3] + s * a3
        else:
            for i in range(o, stop):
                acc = zero
                for q in range(rank):
                    acc += B[i, q] * t[q]
                out[i] = y[i] + s * acc
        o = stop


@njit(**JIT_OPTIONS)
def _add_low_rank(Y, B, scaling, out):
    """``out[b] = Y[b, :m] + scaling * B @ Y[b, m:]`` for each row ``b``.

    ``Y`` is ``X [W; A]^T``: its first ``m = out_features`` columns are
    ``X W^T``, the last ``rank`` are ``X A^T``.  Serial, on the calling
    thread, so it never meets a BLAS's worker threads still spinning after
    the product; the rows after the first find B in the caches.
    """
    m = B.shape[0]
    # The scaling rounded once to the dtype, as BLAS takes its alpha: one
    # that rounds to zero skips the term (never 0 * inf).
    s = out.dtype.type(scaling)
    for b in range(out.shape[0]):
        if s == 0:
            out[b, :] = Y[b, :m]
        else:
            _low_rank_rows(Y[b, :m], Y[b, m:], B, s, out[b], 0, m)


@njit(**JIT_OPTIONS)
def _forward_stacked(WA, B, scaling, x, out):
    out_features, rank = _check_stacked(WA, B)
    if x.shape[0] != WA.shape[1] or out.shape[0] != out_features:
        raise LoraShapeError("x must be (in_features,) and out (out_features,)")
    if not (x.flags.c_contiguous and out.flags.c_contiguous):
        raise LoraShapeError("x and out must be contiguous")
    if scaling == 0 or rank == 0:
        gemv_n(1.0, WA[:out_features], x, 0.0, out)
        return out
    # One pass over W and A together gives W x and A x; then out = y + s B t.
    y = np.empty((1, WA.shape[0]), dtype=out.dtype)
    gemv_n(1.0, WA, x, 0.0, y[0])
    _add_low_rank(y, B, scaling, out.reshape((1, out_features)))
    return out


_forward_stacked_checked = guarded(
    "forward_stacked", (("WA", "f2"), ("B", "f2"), ("scaling", "real"), ("x", "f1"),
                        ("out", "f1w")), _forward_stacked)
_forward_stacked_quiet = quiet(_forward_stacked_checked)


@njit(**JIT_OPTIONS)
def forward_stacked(WA, B, scaling, x, out):
    """:func:`forward` with W and A stacked in one array: one pass over both.

    ``WA[:out_features]`` is W and ``WA[out_features:]`` is A (both
    C-contiguous views of one buffer, as :class:`~numba_lora.LoraLinear`
    stores them), so one matrix-vector product yields ``W x`` and ``A x``
    in a single read of the memory; ``B (A x)`` is then added in one serial
    pass over B, on the calling thread, which asks for B's cache lines ahead
    of use (B comes from memory after the product).  For one vector
    (token-by-token decoding), where reading W is the whole cost:
    1.004-1.018x the dense ``W @ x`` at 4096 x 4096 float32, rank 16.

    Parameters
    ----------
    WA : ndarray, shape (out_features + rank, in_features)
        ``np.vstack([W, A])``, C-contiguous.
    B : ndarray, shape (out_features, rank)
        LoRA up-projection, C-contiguous; its shape gives ``rank``.
    scaling : float
        Multiplier of the low-rank term; ``0`` reads W only.
    x : ndarray, shape (in_features,)
        Input vector, contiguous.
    out : ndarray, shape (out_features,)
        Output, contiguous and writable; overwritten.

    Returns
    -------
    out : ndarray, shape (out_features,)
        The same array as ``out``.

    Raises
    ------
    LoraTypeError, LoraDtypeError, LoraShapeError
        When the call is compiled: an argument is not an array, or has the
        wrong number of dimensions, the float arrays do not share one dtype
        (float32 or float64), or the output is read-only.  The message names
        the kernel and the argument.
    LoraShapeError
        When it runs: the shapes do not fit together, or an array is not
        C-contiguous.  Nothing has been written then.

    See Also
    --------
    forward : The same with W and A apart.
    forward_batch_stacked : A few rows at once.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((6, 4))                  # (out_features, in_features)
    >>> A = rng.standard_normal((2, 4))                  # (rank, in_features)
    >>> B = rng.standard_normal((6, 2))                  # (out_features, rank)
    >>> WA = np.vstack([W, A])                           # as LoraLinear stores them
    >>> x = rng.standard_normal(4)
    >>> out = kernels.forward_stacked(WA, B, 0.5, x, np.empty(6))
    >>> np.allclose(out, kernels.forward(W, A, B, 0.5, x, np.empty(6)))
    True
    """
    return _forward_stacked_checked(WA, B, scaling, x, out)


#: Batches of at most this many rows: one matrix-vector product over
#: ``[W; A]`` per row.  OpenBLAS's gemm at 2 to 8 rows x 4096 x 4096
#: float32 takes 3-4x one gemv (it packs W before multiplying): two gemvs
#: beat it (0.65-0.67x), four do not (1.10-1.12x).  See docs/performance.rst.
PER_ROW_MAX_ROWS = 2


@njit(**JIT_OPTIONS)
def _forward_batch_stacked(WA, B, scaling, X, out):
    out_features, rank = _check_stacked(WA, B)
    batch = X.shape[0]
    if X.shape[1] != WA.shape[1] or out.shape[0] != batch or out.shape[1] != out_features:
        raise LoraShapeError("X must be (batch, in_features) and out (batch, out_features)")
    if not (X.flags.c_contiguous and out.flags.c_contiguous):
        raise LoraShapeError("X and out must be C-contiguous")
    if batch == 0:
        return out
    if scaling == 0 or rank == 0:
        gemm_nt(1.0, X, WA[:out_features], 0.0, out)
        return out
    if batch <= PER_ROW_MAX_ROWS:
        for b in range(batch):
            _forward_stacked(WA, B, scaling, X[b], out[b])
        return out
    Y = np.empty((batch, WA.shape[0]), dtype=out.dtype)
    gemm_nt(1.0, X, WA, 0.0, Y)
    _add_low_rank(Y, B, scaling, out)
    return out


_forward_batch_stacked_checked = guarded(
    "forward_batch_stacked", (("WA", "f2"), ("B", "f2"), ("scaling", "real"), ("X", "f2"),
                              ("out", "f2w")), _forward_batch_stacked)
_forward_batch_stacked_quiet = quiet(_forward_batch_stacked_checked)


@njit(**JIT_OPTIONS)
def forward_batch_stacked(WA, B, scaling, X, out):
    """:func:`forward_batch` with W and A stacked in one array: one pass over both.

    For a few rows (decoding several sequences at once), where the product
    is still bound by reading W: one gemm over ``[W; A]`` gives ``X W^T``
    and ``X A^T`` together, and one serial pass over B adds the low-rank
    term to every row.  Up to two rows (``PER_ROW_MAX_ROWS``) take one
    matrix-vector product over ``[W; A]`` per row instead (OpenBLAS's gemm
    packs W first and is slower than two gemvs there).  From three rows on,
    :func:`forward_batch` measured faster (8 rows, 4096 x 4096 float32:
    1.01-1.02x the dense gemm, against 1.02-1.05x for this kernel's gemm)
    and needs no (batch, out_features + rank) temporary; that is what
    :class:`~numba_lora.LoraLinear` calls there.

    Parameters
    ----------
    WA : ndarray, shape (out_features + rank, in_features)
        ``np.vstack([W, A])``, C-contiguous.
    B : ndarray, shape (out_features, rank)
        LoRA up-projection, C-contiguous; its shape gives ``rank``.
    scaling : float
        Multiplier of the low-rank term; ``0`` reads W only.
    X : ndarray, shape (batch, in_features)
        Input rows, C-contiguous; ``batch`` may be 0.
    out : ndarray, shape (batch, out_features)
        Output, C-contiguous and writable; overwritten.

    Returns
    -------
    out : ndarray, shape (batch, out_features)
        The same array as ``out``.

    Raises
    ------
    LoraTypeError, LoraDtypeError, LoraShapeError
        When the call is compiled: an argument is not an array, or has the
        wrong number of dimensions, the float arrays do not share one dtype
        (float32 or float64), or the output is read-only.  The message names
        the kernel and the argument.
    LoraShapeError
        When it runs: the shapes do not fit together, or an array is not
        C-contiguous.  Nothing has been written then.

    See Also
    --------
    forward_batch : The same with W and A apart.
    forward_stacked : One vector.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((6, 4))                  # (out_features, in_features)
    >>> A = rng.standard_normal((2, 4))                  # (rank, in_features)
    >>> B = rng.standard_normal((6, 2))                  # (out_features, rank)
    >>> WA = np.vstack([W, A])                           # as LoraLinear stores them
    >>> X = rng.standard_normal((3, 4))
    >>> out = kernels.forward_batch_stacked(WA, B, 0.5, X, np.empty((3, 6)))
    >>> np.allclose(out, X @ W.T + 0.5 * (X @ A.T) @ B.T)
    True
    """
    return _forward_batch_stacked_checked(WA, B, scaling, X, out)


# ------------------------------------------------------------------- merge
#: Ranks above this are summed in blocks (see :func:`_delta_tile`).
CHAIN_MAX_RANK = 192


@njit(**EXACT_OPTIONS)
def _chain(A, B, i, j0, width, k0, k1, start, acc):
    """``acc[:width] = start``, then ``acc[j] = fma(B[i, k], A[k, j0 + j], acc[j])`` for k0 <= k < k1.

    Four steps of the chain share one load and store of ``acc`` (each step
    still rounds once, in order), and the loop over ``j`` vectorises because
    the elements are independent.
    """
    a = acc[:width]
    for j in range(width):
        a[j] = start
    k = k0
    while k + 4 <= k1:
        A0 = A[k, j0:j0 + width]
        A1 = A[k + 1, j0:j0 + width]
        A2 = A[k + 2, j0:j0 + width]
        A3 = A[k + 3, j0:j0 + width]
        b0, b1, b2, b3 = B[i, k], B[i, k + 1], B[i, k + 2], B[i, k + 3]
        for j in range(width):
            a[j] = fma(b3, A3[j], fma(b2, A2[j], fma(b1, A1[j], fma(b0, A0[j], a[j]))))
        k += 4
    while k < k1:
        Ak = A[k, j0:j0 + width]
        bk = B[i, k]
        for j in range(width):
            a[j] = fma(bk, Ak[j], a[j])
        k += 1


@njit(**EXACT_OPTIONS)
def _delta_tile(A, B, i, j0, width, acc, part):
    """``acc[:width] = (B @ A)[i, j0:j0+width]``, summed in PEFT's (torch's CPU) order.

    - rank 1: the product ``B[i, 0] * A[0, j]`` rounded once (a chain from
      ``-0.0``, which keeps the product's sign of zero);
    - rank 2 .. CHAIN_MAX_RANK: ``p = fma(B[i, k], A[k, j], p)`` for k
      ascending from ``p = +0.0``;
    - higher ranks: k cut into blocks of ``min(CHAIN_MAX_RANK, rank // 2)``
      (the last block takes what is left), each block such a chain from
      ``+0.0``, the block sums added left to right, each addition rounded.

    ``part`` is scratch of the same size as ``acc``.
    """
    rank = A.shape[0]
    zero = acc.dtype.type(0)
    if rank == 1:
        _chain(A, B, i, j0, width, 0, 1, -zero, acc)
    elif rank <= CHAIN_MAX_RANK:
        _chain(A, B, i, j0, width, 0, rank, zero, acc)
    else:
        block = min(CHAIN_MAX_RANK, rank // 2)
        _chain(A, B, i, j0, width, 0, block, zero, acc)
        for k0 in range(block, rank, block):
            _chain(A, B, i, j0, width, k0, min(rank, k0 + block), zero, part)
            for j in range(width):
                acc[j] = acc[j] + part[j]


@njit(**EXACT_OPTIONS)
def _block_chain(A, B, i0, j0, width, k0, k1, start, acc):
    """:func:`_chain` for the four rows i0..i0+3 at once, into ``acc[r, :width]``.

    Whole groups of BLOCK_BYTES of columns go through :func:`fma_block4` (the
    four rows' sums stay in vector registers over the whole k range); the
    last columns through :func:`_chain`, row by row.  Same arithmetic either way.
    """
    lanes = BLOCK_BYTES // acc.itemsize
    main = width - width % lanes
    for c in range(0, main, lanes):
        fma_block4(A, B, i0, j0 + c, k0, k1, start, acc, c)
    if main < width:
        for r in range(BLOCK_ROWS):
            _chain(A, B, i0 + r, j0 + main, width - main, k0, k1, start, acc[r, main:])


@njit(**EXACT_OPTIONS)
def _rows_delta(A, B, i0, rows, j0, width, acc, part):
    """``acc[r, :width] = (B @ A)[i0 + r, j0:j0+width]`` for r < rows, in :func:`_delta_tile`'s order."""
    if rows < BLOCK_ROWS:
        for r in range(rows):
            _delta_tile(A, B, i0 + r, j0, width, acc[r], part[r])
        return
    rank = A.shape[0]
    zero = acc.dtype.type(0)
    if rank == 1:
        _block_chain(A, B, i0, j0, width, 0, 1, -zero, acc)
    elif rank <= CHAIN_MAX_RANK:
        _block_chain(A, B, i0, j0, width, 0, rank, zero, acc)
    else:
        block = min(CHAIN_MAX_RANK, rank // 2)
        _block_chain(A, B, i0, j0, width, 0, block, zero, acc)
        for k0 in range(block, rank, block):
            _block_chain(A, B, i0, j0, width, k0, min(rank, k0 + block), zero, part)
            for r in range(BLOCK_ROWS):
                for j in range(width):
                    acc[r, j] = acc[r, j] + part[r, j]


@njit(**EXACT_OPTIONS)
def _scratch(W):
    """Accumulator and block-sum scratch for :func:`_rows_delta`: (BLOCK_ROWS, tile) each."""
    width = min(COL_TILE, W.shape[1])
    return (np.empty((BLOCK_ROWS, width), dtype=W.dtype),
            np.empty((BLOCK_ROWS, width), dtype=W.dtype))


@njit(**EXACT_OPTIONS)
def _update_rows(W, A, B, s, r0, r1, mode):
    """Rows r0..r1-1 of W: ``W = W + delta`` (or ``- delta``), ``delta = (B @ A) * s`` rounded."""
    in_features = W.shape[1]
    itemsize = W.itemsize
    base = W.ctypes.data
    acc, part = _scratch(W)
    for i0 in range(r0, r1, BLOCK_ROWS):
        rows = min(BLOCK_ROWS, r1 - i0)
        for j0 in range(0, in_features, COL_TILE):
            width = min(COL_TILE, in_features - j0)
            # Ask for the W tiles now, so that memory delivers them while
            # the deltas are computed instead of after (only a hint).
            for r in range(rows):
                start = ((i0 + r) * in_features + j0) * itemsize
                for offset in range(start, start + width * itemsize, 64):
                    prefetch(base + offset)
            _rows_delta(A, B, i0, rows, j0, width, acc, part)
            for r in range(rows):
                w = W[i0 + r, j0:j0 + width]
                d = acc[r]
                if mode == _SUBTRACT:
                    for j in range(width):
                        w[j] = w[j] - d[j] * s
                else:
                    for j in range(width):
                        w[j] = w[j] + d[j] * s


@njit(**EXACT_OPTIONS)
def _n_blocks(W):
    return (W.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK


@njit(parallel=True, **EXACT_OPTIONS)
def _update_parallel(W, A, B, s, mode):
    n = _n_blocks(W)
    for ib in prange(n):
        _update_rows(W, A, B, s, ib * ROW_BLOCK, min(W.shape[0], (ib + 1) * ROW_BLOCK), mode)


@njit(**EXACT_OPTIONS)
def _merge(W, A, B, scaling, mode, parallel):
    _check_lora_shapes(W, A, B)
    # The scaling is rounded once to W's dtype, as PEFT's float32 merge does.
    s = W.dtype.type(scaling)
    if parallel:
        _update_parallel(W, A, B, s, mode)
    else:
        _update_rows(W, A, B, s, 0, W.shape[0], mode)


@njit(**EXACT_OPTIONS)
def _merge_add(W, A, B, scaling):
    _merge(W, A, B, scaling, _ADD, True)


@njit(**EXACT_OPTIONS)
def _merge_subtract(W, A, B, scaling):
    _merge(W, A, B, scaling, _SUBTRACT, True)


@njit(**EXACT_OPTIONS)
def _merge_add_serial(W, A, B, scaling):
    _merge(W, A, B, scaling, _ADD, False)


@njit(**EXACT_OPTIONS)
def _merge_subtract_serial(W, A, B, scaling):
    _merge(W, A, B, scaling, _SUBTRACT, False)


_merge_checked = guarded("merge", _LORA_W, _merge_add)
_unmerge_checked = guarded("unmerge", _LORA_W, _merge_subtract)
_merge_serial_checked = guarded("merge_serial", _LORA_W, _merge_add_serial)
_unmerge_serial_checked = guarded("unmerge_serial", _LORA_W, _merge_subtract_serial)


@njit(**EXACT_OPTIONS)
def merge(W, A, B, scaling):
    """In place, ``W += scaling * B @ A``, bit-identical to PEFT's merge, on Numba's threads.

    Each element is computed in W's dtype in one fixed order: ``p`` is the
    fused multiply-add chain ``p = fma(B[i, k], A[k, j], p)`` over
    ``k = 0 .. rank-1`` from ``p = +0`` (rank 1: the plain product; ranks
    above 192: such chains over blocks of k, added; see ``CHAIN_MAX_RANK``),
    then ``delta = p * s`` rounded once, with ``s`` the scaling rounded once
    to W's dtype, then ``W + delta`` rounded once.  Rows are split over
    Numba's threads, never an element's sum, so the result is the same bits
    for any thread count, and equals PEFT's ``merge_and_unload()`` for
    float32 (torch's CPU order).  No W-sized temporary.

    Parameters
    ----------
    W : ndarray, shape (out_features, in_features)
        Weight updated in place, C-contiguous and writable.
    A : ndarray, shape (rank, in_features)
        LoRA down-projection, C-contiguous.
    B : ndarray, shape (out_features, rank)
        LoRA up-projection, C-contiguous.
    scaling : float
        Multiplier of the low-rank term (``alpha / rank`` for plain LoRA).

    Returns
    -------
    None
        W is updated in place.

    Raises
    ------
    LoraTypeError, LoraDtypeError, LoraShapeError
        When the call is compiled: an argument is not an array, or has the
        wrong number of dimensions, the float arrays do not share one dtype
        (float32 or float64), or the output is read-only.  The message names
        the kernel and the argument.
    LoraShapeError
        When it runs: the shapes do not fit together, or an array is not
        C-contiguous.  Nothing has been written then.

    See Also
    --------
    unmerge : Subtracts the same delta.
    merge_serial : The same arithmetic on the calling thread.
    count_nonfinite_merged : Predicts, without writing, whether this merge
        would make any element NaN or infinite.
    merge_bf16 : The same delta into bfloat16 weights.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((6, 4))                  # (out_features, in_features)
    >>> A = rng.standard_normal((2, 4))                  # (rank, in_features)
    >>> B = rng.standard_normal((6, 2))                  # (out_features, rank)
    >>> W0 = W.copy()
    >>> kernels.merge(W, A, B, 0.5)
    >>> np.allclose(W, W0 + 0.5 * B @ A)
    True
    >>> kernels.unmerge(W, A, B, 0.5)
    >>> np.allclose(W, W0)
    True
    """
    _merge_checked(W, A, B, scaling)


@njit(**EXACT_OPTIONS)
def unmerge(W, A, B, scaling):
    """In place, ``W -= scaling * B @ A``: subtracts bitwise the delta :func:`merge` adds.

    Because the delta is the same bits, a merge/unmerge cycle ends within
    one rounding of where it started, and later cycles reproduce the first
    cycle's result bit for bit, whatever the thread counts of each call.

    Parameters
    ----------
    W : ndarray, shape (out_features, in_features)
        Weight updated in place, C-contiguous and writable.
    A : ndarray, shape (rank, in_features)
        LoRA down-projection, C-contiguous.
    B : ndarray, shape (out_features, rank)
        LoRA up-projection, C-contiguous.
    scaling : float
        Multiplier of the low-rank term (``alpha / rank`` for plain LoRA).

    Returns
    -------
    None
        W is updated in place.

    Raises
    ------
    LoraTypeError, LoraDtypeError, LoraShapeError
        When the call is compiled: an argument is not an array, or has the
        wrong number of dimensions, the float arrays do not share one dtype
        (float32 or float64), or the output is read-only.  The message names
        the kernel and the argument.
    LoraShapeError
        When it runs: the shapes do not fit together, or an array is not
        C-contiguous.  Nothing has been written then.

    See Also
    --------
    merge : Adds the delta.
    unmerge_serial : The same arithmetic on the calling thread.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((6, 4))                  # (out_features, in_features)
    >>> A = rng.standard_normal((2, 4))                  # (rank, in_features)
    >>> B = rng.standard_normal((6, 2))                  # (out_features, rank)
    >>> W0 = W.copy()
    >>> kernels.merge(W, A, B, 0.5)
    >>> np.allclose(W, W0 + 0.5 * B @ A)
    True
    >>> kernels.unmerge(W, A, B, 0.5)
    >>> np.allclose(W, W0)
    True
    """
    _unmerge_checked(W, A, B, scaling)


@njit(**EXACT_OPTIONS)
def merge_serial(W, A, B, scaling):
    """:func:`merge` on the calling thread only (no threads), for a caller's ``prange``.

    Bit-identical to :func:`merge`.  Call it from your own ``@njit``
    function, for example inside a ``prange`` over many layers, where the
    threaded :func:`merge` would oversubscribe the cores.

    Parameters
    ----------
    W : ndarray, shape (out_features, in_features)
        Weight updated in place, C-contiguous and writable.
    A : ndarray, shape (rank, in_features)
        LoRA down-projection, C-contiguous.
    B : ndarray, shape (out_features, rank)
        LoRA up-projection, C-contiguous.
    scaling : float
        Multiplier of the low-rank term (``alpha / rank`` for plain LoRA).

    Returns
    -------
    None
        W is updated in place.

    Raises
    ------
    LoraTypeError, LoraDtypeError, LoraShapeError
        When the call is compiled: an argument is not an array, or has the
        wrong number of dimensions, the float arrays do not share one dtype
        (float32 or float64), or the output is read-only.  The message names
        the kernel and the argument.
    LoraShapeError
        When it runs: the shapes do not fit together, or an array is not
        C-contiguous.  Nothing has been written then.

    See Also
    --------
    merge : The same on Numba's threads.
    unmerge_serial : Subtracts the same delta.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((6, 4))                  # (out_features, in_features)
    >>> A = rng.standard_normal((2, 4))                  # (rank, in_features)
    >>> B = rng.standard_normal((6, 2))                  # (out_features, rank)
    >>> from numba import njit
    >>> @njit
    ... def merge_layers(Ws, As, Bs, scaling):          # your own loop over layers
    ...     for k in range(Ws.shape[0]):
    ...         kernels.merge_serial(Ws[k], As[k], Bs[k], scaling)
    >>> Ws = np.stack([W, 2 * W]); expected = Ws + 0.5 * (B @ A)
    >>> merge_layers(Ws, np.stack([A, A]), np.stack([B, B]), 0.5)
    >>> np.allclose(Ws, expected)
    True
    """
    _merge_serial_checked(W, A, B, scaling)


@njit(**EXACT_OPTIONS)
def unmerge_serial(W, A, B, scaling):
    """:func:`unmerge` on the calling thread only; bit-identical to it.

    For a caller's own ``prange`` loop, as :func:`merge_serial`.

    Parameters
    ----------
    W : ndarray, shape (out_features, in_features)
        Weight updated in place, C-contiguous and writable.
    A : ndarray, shape (rank, in_features)
        LoRA down-projection, C-contiguous.
    B : ndarray, shape (out_features, rank)
        LoRA up-projection, C-contiguous.
    scaling : float
        Multiplier of the low-rank term (``alpha / rank`` for plain LoRA).

    Returns
    -------
    None
        W is updated in place.

    Raises
    ------
    LoraTypeError, LoraDtypeError, LoraShapeError
        When the call is compiled: an argument is not an array, or has the
        wrong number of dimensions, the float arrays do not share one dtype
        (float32 or float64), or the output is read-only.  The message names
        the kernel and the argument.
    LoraShapeError
        When it runs: the shapes do not fit together, or an array is not
        C-contiguous.  Nothing has been written then.

    See Also
    --------
    unmerge : The same on Numba's threads.
    merge_serial : Adds the delta.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((6, 4))                  # (out_features, in_features)
    >>> A = rng.standard_normal((2, 4))                  # (rank, in_features)
    >>> B = rng.standard_normal((6, 2))                  # (out_features, rank)
    >>> W0 = W.copy()
    >>> kernels.merge_serial(W, A, B, 0.5)
    >>> kernels.unmerge_serial(W, A, B, 0.5)
    >>> np.allclose(W, W0)
    True
    """
    _unmerge_serial_checked(W, A, B, scaling)


# ------------------------------------------------------------- finiteness
@njit(**EXACT_OPTIONS)
def _count_rows(W, A0, B0, A1, B1, s, r0, r1, replace, limit):
    """Elements of rows r0..r1-1 whose merged value would not be finite.

    The value is computed exactly as the merge computes it: ``W + delta1``,
    or ``(W - delta0) + delta1`` when ``replace`` (an unmerge of (A0, B0)
    followed by a merge of (A1, B1)).  Nothing is written.
    """
    in_features = W.shape[1]
    acc0, part = _scratch(W)
    acc1, _ = _scratch(W)
    count = 0
    for i0 in range(r0, r1, BLOCK_ROWS):
        rows = min(BLOCK_ROWS, r1 - i0)
        for j0 in range(0, in_features, COL_TILE):
            width = min(COL_TILE, in_features - j0)
            _rows_delta(A1, B1, i0, rows, j0, width, acc1, part)
            if replace:
                _rows_delta(A0, B0, i0, rows, j0, width, acc0, part)
            for r in range(rows):
                w = W[i0 + r, j0:j0 + width]
                for j in range(width):
                    value = w[j]
                    if replace:
                        value = value - acc0[r, j] * s
                    value = value + acc1[r, j] * s
                    # Written so that NaN fails the test too.
                    if not (abs(value) <= limit):
                        count += 1
    return count


@njit(parallel=True, **EXACT_OPTIONS)
def _count_parallel(W, A0, B0, A1, B1, scaling, replace):
    s = W.dtype.type(scaling)
    limit = W.dtype.type(np.finfo(W.dtype).max)
    n = _n_blocks(W)
    count = 0
    for ib in prange(n):
        count += _count_rows(W, A0, B0, A1, B1, s, ib * ROW_BLOCK,
                             min(W.shape[0], (ib + 1) * ROW_BLOCK), replace, limit)
    return count


@njit(**EXACT_OPTIONS)
def _count_merged(W, A, B, scaling):
    _check_lora_shapes(W, A, B)
    return _count_parallel(W, A, B, A, B, scaling, False)


@njit(**EXACT_OPTIONS)
def _count_remerged(W, A_old, B_old, A_new, B_new, scaling):
    # The shared _check_lora_shapes would name A and B; say which pair.
    out_features, in_features = W.shape
    if A_old.shape[1] != in_features or A_new.shape[1] != in_features:
        raise LoraShapeError("A_old and A_new must be (rank, in_features): "
                             "A_old.shape[1] or A_new.shape[1] != W.shape[1]")
    if B_old.shape[0] != out_features or B_new.shape[0] != out_features:
        raise LoraShapeError("B_old and B_new must be (out_features, rank): "
                             "B_old.shape[0] or B_new.shape[0] != W.shape[0]")
    if B_old.shape[1] != A_old.shape[0]:
        raise LoraShapeError("rank mismatch: B_old.shape[1] != A_old.shape[0]")
    if B_new.shape[1] != A_new.shape[0]:
        raise LoraShapeError("rank mismatch: B_new.shape[1] != A_new.shape[0]")
    if not (W.flags.c_contiguous and A_old.flags.c_contiguous and B_old.flags.c_contiguous
            and A_new.flags.c_contiguous and B_new.flags.c_contiguous):
        raise LoraShapeError("W, A_old, B_old, A_new and B_new must be C-contiguous")
    return _count_parallel(W, A_old, B_old, A_new, B_new, scaling, True)


_count_merged_checked = guarded("count_nonfinite_merged", _LORA, _count_merged)
_count_remerged_checked = guarded(
    "count_nonfinite_remerged",
    (("W", "f2"), ("A_old", "f2"), ("B_old", "f2"), ("A_new", "f2"), ("B_new", "f2"),
     ("scaling", "real")),
    _count_remerged)


@njit(**EXACT_OPTIONS)
def count_nonfinite_merged(W, A, B, scaling):
    """How many elements of W would be NaN or infinite after ``merge(W, A, B, scaling)``.

    Computes every merged element exactly as :func:`merge` does (same dtype,
    same order, same rounding of the scaling) and writes nothing, so a count
    of 0 means the merge leaves every element finite, and a count above 0
    that it would not (elements already NaN or infinite in W count too).
    Runs on Numba's threads.

    Parameters
    ----------
    W : ndarray, shape (out_features, in_features)
        Weight as it is before the merge, C-contiguous; may be read-only.
    A : ndarray, shape (rank, in_features)
        LoRA down-projection, C-contiguous.
    B : ndarray, shape (out_features, rank)
        LoRA up-projection, C-contiguous.
    scaling : float
        Multiplier of the low-rank term (``alpha / rank`` for plain LoRA).

    Returns
    -------
    count : int
        The number of elements that would not be finite.

    Raises
    ------
    LoraTypeError, LoraDtypeError, LoraShapeError
        When the call is compiled: an argument is not an array, or has the
        wrong number of dimensions, the float arrays do not share one dtype
        (float32 or float64), or the output is read-only.  The message names
        the kernel and the argument.
    LoraShapeError
        When it runs: the shapes do not fit together, or an array is not
        C-contiguous.  Nothing has been written then.

    See Also
    --------
    merge : The merge whose result this predicts.
    count_nonfinite_remerged : The same for replacing a merged update.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((6, 4))                  # (out_features, in_features)
    >>> A = rng.standard_normal((2, 4))                  # (rank, in_features)
    >>> B = rng.standard_normal((6, 2))                  # (out_features, rank)
    >>> kernels.count_nonfinite_merged(W, A, B, 0.5)
    0
    >>> kernels.count_nonfinite_merged(W, A, B, 1e308) > 0     # this merge would overflow
    True
    """
    return _count_merged_checked(W, A, B, scaling)


@njit(**EXACT_OPTIONS)
def count_nonfinite_remerged(W, A_old, B_old, A_new, B_new, scaling):
    """Like :func:`count_nonfinite_merged` for replacing one merged update by another.

    Counts the elements of ``merge(unmerge(W, A_old, B_old), A_new, B_new)``
    (both with ``scaling``) that would be NaN or infinite, computed exactly
    as those two calls would, without writing.  This is how a layer refuses
    a new factor while merged with W untouched.

    Parameters
    ----------
    W : ndarray, shape (out_features, in_features)
        Weight with the old update merged in, C-contiguous; may be read-only.
    A_old : ndarray, shape (rank_old, in_features)
        Down-projection of the update merged now.
    B_old : ndarray, shape (out_features, rank_old)
        Up-projection of the update merged now.
    A_new : ndarray, shape (rank_new, in_features)
        Down-projection of the update that would replace it.
    B_new : ndarray, shape (out_features, rank_new)
        Up-projection of the update that would replace it.
    scaling : float
        Multiplier of both low-rank terms.

    Returns
    -------
    count : int
        The number of elements that would not be finite.

    Raises
    ------
    LoraTypeError, LoraDtypeError, LoraShapeError
        When the call is compiled: an argument is not an array, or has the
        wrong number of dimensions, the float arrays do not share one dtype
        (float32 or float64), or the output is read-only.  The message names
        the kernel and the argument.
    LoraShapeError
        When it runs: the shapes do not fit together, or an array is not
        C-contiguous.  Nothing has been written then.

    See Also
    --------
    count_nonfinite_merged : For one merge.
    numba_lora.LoraLinear.lora_b : A setter that uses it while merged.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((6, 4))                  # (out_features, in_features)
    >>> A = rng.standard_normal((2, 4))                  # (rank, in_features)
    >>> B = rng.standard_normal((6, 2))                  # (out_features, rank)
    >>> kernels.merge(W, A, B, 0.5)
    >>> kernels.count_nonfinite_remerged(W, A, B, 2 * A, 2 * B, 0.5)
    0
    """
    return _count_remerged_checked(W, A_old, B_old, A_new, B_new, scaling)
