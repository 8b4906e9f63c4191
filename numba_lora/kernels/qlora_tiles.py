"""Batched NF4 products, tiles of W on Numba's threads, each multiplied by a one-thread sgemm.

``out = X @ deq(W).T + scaling * (X A^T) B^T`` for batches above
``qlora.SMALL_BATCH`` rows.  The rows
of W are cut into tiles of :func:`tile_rows` rows; each of Numba's threads
takes whole tiles (tile ``t``, ``t + threads``, ...), dequantizes each into its
own float32 scratch (the tile stays in the last-level cache while it is used) and
multiplies it at once with sgemm into ``out[:, r0:r1]`` (``ldc =
out_features``), on the same thread, then adds that tile's columns of the
low-rank term (``T = X A^T`` is computed first, ``DOWN_ROWS`` rows of X per
task; each tile adds ``scaling * T B[r0:r1]^T`` by sgemm with beta = 1).
No multi-threaded BLAS runs anywhere in the call.

Why BLAS inside ``prange`` is allowed here, when the project's rule forbids
it: the rule exists because BLAS threads times Numba threads oversubscribe
the cores.  For the duration of the loop the BLAS (NumPy's OpenBLAS) is set
to ONE thread, and an OpenBLAS with one thread runs sgemm on the thread that
calls it, so two Numba threads may each call it at once and one thread pool
(Numba's) does all the work.  The former count is put back before the call
returns; every check that can refuse the call runs before the count is
changed.  Meanwhile a NumPy product in another Python thread sees a
one-thread BLAS too (OpenBLAS's count is process-wide).

Where the BLAS has no thread control (it is not OpenBLAS, or the ctypes
adapters of :mod:`._blas` are in use), :func:`build_tiles`' drivers return
``False`` without touching anything and the caller keeps its serial path
(dequantize on the calling thread, multiply on BLAS's threads).

Order of the sums: sgemm's own, per tile; a tile's size changes neither the
rounding of the weights (each is ``nf4.dequantize``'s float32 value) nor
which weights each output sums over.
"""

import numpy as np
from numba import njit, prange

from .._config import JIT_OPTIONS
from ._blas import (CBLAS_NO_TRANS, CBLAS_ROW_MAJOR, CBLAS_TRANS, _blas_get_threads,
                    _blas_set_threads, _sgemm)

#: Bytes of float32 scratch per thread's tile of W (256 rows at 4096; two
#: threads' tiles stay in a 32 MiB L3).  Each sgemm packs all of X again, for
#: ``rows`` columns of out: measured at 4096 x 4096 on 2 busy cores (load 3-4),
#: 64-row tiles were 5-10% slower at 512 rows and no faster at 64.
TILE_BYTES = 4 << 20
#: Fewest rows of W per tile, whatever ``in_features``.
MIN_TILE_ROWS = 16


@njit(**JIT_OPTIONS)
def tile_rows(out_features, in_features):
    """Rows of W per tile: ``TILE_BYTES`` of float32 rows, rounded down to a multiple of 8,
    at least ``MIN_TILE_ROWS``, at most ``out_features``."""
    rows = TILE_BYTES // (4 * max(1, in_features))
    rows = max(MIN_TILE_ROWS, rows - rows % 8)
    return max(1, min(out_features, rows))


@njit(**JIT_OPTIONS)
def _tile_product(X, tile, nrows, out, r0):
    """``out[:, r0: r0 + nrows] = X @ tile[:nrows].T`` by sgemm (ldc = out.shape[1]).

    Callers guarantee the shapes (checked before the parallel loop):
    X (batch, k), tile (>= nrows, k), out (batch, n) with r0 + nrows <= n,
    all C-contiguous float32, batch, nrows and k positive.
    """
    batch, k = X.shape
    _sgemm(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS, batch, nrows, k, np.float32(1.0),
           X.ctypes, k, tile.ctypes, k, np.float32(0.0), out[0, r0:].ctypes, out.shape[1])


#: Rows of X per task when ``T = X A^T`` is computed before the tiles.
DOWN_ROWS = 64


@njit(**JIT_OPTIONS)
def _down_rows(X, A, T, b0, b1):
    """``T[b0:b1] = X[b0:b1] @ A.T`` by sgemm (callers checked the shapes; rank > 0)."""
    k = X.shape[1]
    rank = A.shape[0]
    _sgemm(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS, b1 - b0, rank, k, np.float32(1.0),
           X[b0:].ctypes, k, A.ctypes, k, np.float32(0.0), T[b0:].ctypes, rank)


@njit(**JIT_OPTIONS)
def _up_tile(T, B, s, out, r0, nrows):
    """``out[:, r0: r0 + nrows] += s * T @ B[r0: r0 + nrows].T`` by sgemm with beta = 1."""
    batch, rank = T.shape
    _sgemm(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS, batch, nrows, rank, s,
           T.ctypes, rank, B[r0:].ctypes, rank, np.float32(1.0), out[0, r0:].ctypes,
           out.shape[1])


def _one_blas_thread():
    """The BLAS's thread count before this call, set to 1; -1 (and nothing set) without control."""
    saved = _blas_get_threads()
    if saved > 1:
        _blas_set_threads(1)
    return saved


def _restore_blas_threads(saved):
    if saved > 1:
        _blas_set_threads(saved)


_one_blas_thread = njit(**JIT_OPTIONS)(_one_blas_thread)
_restore_blas_threads = njit(**JIT_OPTIONS)(_restore_blas_threads)


def build_tiles(tag, dequantize_tile, dq_absmax):
    """The tiled drivers over one dequantization path.

    ``dequantize_tile(packed, absmax, abase, code, blocksize, r0, tile)`` writes
    rows ``r0 ..`` of deq(W) into ``tile`` (absmax[b - abase] scales block b);
    ``dq_absmax(absmax_q, nested_absmax, nested_code, offset, b0, b1, absmax)``
    decodes double-quant scales.  Returns a dict: "tiled" and "tiled_dq" each compute
    ``out = X @ deq(W).T + scaling * (X @ A.T) @ B.T`` and return True, or return
    False, touching nothing, where the BLAS has no thread control.  The
    callers have checked every shape (``qlora._check_batch``), and batch,
    in_features and out_features are positive.  "loop" and "loop_dq" are the
    parallel loops with the tile's rows and the thread count as arguments
    (the BLAS must already be at one thread), for measurements.
    """

    def named(function, name):
        function.__name__ = function.__qualname__ = f"_{name}_{tag}"
        return function

    # One task per tile, its scratch allocated in the task: ``numba.get_num_threads``
    # inside compiled code would make it uncacheable (it calls through ctypes),
    # and after the first tile malloc hands the same freed block back.
    # The low-rank term is done here too, each tile's columns by its own task:
    # a multi-threaded sgemm after the loop would wake OpenBLAS's workers,
    # which then spin for ~0.1 s against the next call's Numba threads
    # (measured: every call after the first of a burst 1.7-2x slower).
    def down(X, A, s):
        batch = X.shape[0]
        rank = A.shape[0] if s != 0 else 0
        T = np.empty((batch, rank), dtype=np.float32)
        if rank > 0:
            for c in prange((batch + DOWN_ROWS - 1) // DOWN_ROWS):
                _down_rows(X, A, T, c * DOWN_ROWS, min(batch, (c + 1) * DOWN_ROWS))
        return T

    def loop(packed, absmax, code, blocksize, X, A, B, scaling, out, rows):
        in_features = X.shape[1]
        out_features = out.shape[1]
        s = np.float32(scaling)
        T = down(X, A, s)
        for k in prange((out_features + rows - 1) // rows):
            r0 = k * rows
            r1 = min(out_features, r0 + rows)
            tile = np.empty((r1 - r0, in_features), dtype=np.float32)
            dequantize_tile(packed, absmax, 0, code, blocksize, r0, tile)
            _tile_product(X, tile, r1 - r0, out, r0)
            if T.shape[1] > 0:
                _up_tile(T, B, s, out, r0, r1 - r0)

    def loop_dq(packed, absmax_q, nested_absmax, nested_code, offset, code, blocksize, X, A, B,
                scaling, out, rows):
        in_features = X.shape[1]
        out_features = out.shape[1]
        s = np.float32(scaling)
        T = down(X, A, s)
        for k in prange((out_features + rows - 1) // rows):
            r0 = k * rows
            r1 = min(out_features, r0 + rows)
            b0 = (r0 * in_features) // blocksize
            b1 = (r1 * in_features + blocksize - 1) // blocksize
            absmax = np.empty(b1 - b0, dtype=np.float32)
            dq_absmax(absmax_q, nested_absmax, nested_code, offset, b0, b1, absmax)
            tile = np.empty((r1 - r0, in_features), dtype=np.float32)
            dequantize_tile(packed, absmax, b0, code, blocksize, r0, tile)
            _tile_product(X, tile, r1 - r0, out, r0)
            if T.shape[1] > 0:
                _up_tile(T, B, s, out, r0, r1 - r0)

    # BLAS inside prange on purpose: see the module docstring (one BLAS thread).
    down = njit(parallel=True, **JIT_OPTIONS)(named(down, "tiles_down"))
    loop = njit(parallel=True, **JIT_OPTIONS)(named(loop, "tiles_loop"))
    loop_dq = njit(parallel=True, **JIT_OPTIONS)(named(loop_dq, "tiles_loop_dq"))

    def tiled(packed, absmax, code, blocksize, A, B, scaling, X, out):
        saved = _one_blas_thread()
        if saved < 1:
            return False
        loop(packed, absmax, code, blocksize, X, A, B, scaling, out,
             tile_rows(out.shape[1], X.shape[1]))
        _restore_blas_threads(saved)
        return True

    def tiled_dq(packed, absmax_q, nested_absmax, nested_code, offset, code, blocksize, A, B,
                 scaling, X, out):
        saved = _one_blas_thread()
        if saved < 1:
            return False
        loop_dq(packed, absmax_q, nested_absmax, nested_code, offset, code, blocksize, X, A, B,
                scaling, out, tile_rows(out.shape[1], X.shape[1]))
        _restore_blas_threads(saved)
        return True

    return {"tiled": njit(**JIT_OPTIONS)(named(tiled, "tiled")),
            "tiled_dq": njit(**JIT_OPTIONS)(named(tiled_dq, "tiled_dq")),
            "loop": loop, "loop_dq": loop_dq}
