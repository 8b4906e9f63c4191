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
``forward``, ``forward_batch``, ``merge`` and ``unmerge`` are BLAS calls on
the BLAS NumPy itself uses (see ``numba_lora.kernels._blas``), so they share one
thread pool with the user's own NumPy products; ``threadpoolctl`` limits
them, as it limits NumPy.  ``count_nonfinite_merged`` and merges of rank
above ``BLAS_MERGE_MAX_RANK`` run on Numba's threads
(``numba.set_num_threads``).  ``merge_serial`` and ``unmerge_serial`` use no
threads and are meant for a caller's own ``prange`` loop; never call the
BLAS-backed kernels inside a ``prange`` body (BLAS threads times Numba
threads oversubscribe the cores).

Numerical behaviour of merge
----------------------------
``merge`` is one gemm with ``beta = 1``: ``W`` is updated in place, with no
temporary, and each element is rounded once, after the rank-long sum (BLAS
sums the whole of ``k`` in registers when the rank fits one of its panels,
which is why ranks above ``BLAS_MERGE_MAX_RANK`` take the tiled path).
``unmerge`` is the same gemm with ``-scaling``, so it subtracts exactly the
delta ``merge`` added: after one cycle each element is within one rounding
(half an ulp of the merged value plus half an ulp of the result) of where it
started, and further cycles reproduce the first cycle's result bit for bit.

``merge_serial``/``unmerge_serial`` (and the high-rank path) compute each
element of the delta as ``sum_k (scaling * B[i, k]) * A[k, j]`` in the
arrays' dtype, in an order fixed by the rank, and add it once; they are each
other's exact inverse too, and independent of any thread count, but they
round differently from BLAS: unmerge what ``merge`` merged with ``unmerge``.
"""

from .lora import (
    BLAS_MERGE_MAX_RANK,
    count_nonfinite_merged,
    forward,
    forward_batch,
    merge,
    merge_serial,
    unmerge,
    unmerge_serial,
)
from .multi import (
    SEGMENTED_MIN_ROWS,
    forward_batch_multi,
    forward_batch_multi_rows,
    forward_batch_multi_segmented,
    group_rows,
)

__all__ = [
    "forward",
    "forward_batch",
    "merge",
    "unmerge",
    "merge_serial",
    "unmerge_serial",
    "count_nonfinite_merged",
    "forward_batch_multi",
    "forward_batch_multi_segmented",
    "forward_batch_multi_rows",
    "group_rows",
    "BLAS_MERGE_MAX_RANK",
    "SEGMENTED_MIN_ROWS",
]
