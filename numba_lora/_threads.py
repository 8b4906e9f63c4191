"""One thread count for everything numba_lora runs."""

from __future__ import annotations

import numba

from ._validate import check_thread_count
from .kernels._blas import blas_threads, set_blas_threads

__all__ = ["set_num_threads", "get_num_threads"]


def set_num_threads(n: int) -> int:
    """Use ``n`` threads in Numba and in the BLAS the kernels call.

    ``forward``, ``forward_batch``, ``merge`` and ``unmerge`` run on the BLAS
    that NumPy uses (and so do your own NumPy products); the tiled high-rank
    merge and ``count_nonfinite_merged`` run on Numba's threads.  Setting both
    to the same number keeps them from oversubscribing the cores.  Numba's
    count is per Python thread, like ``numba.set_num_threads``; BLAS's is
    process-wide.

    Parameters
    ----------
    n : int
        Between 1 and ``numba.config.NUMBA_NUM_THREADS``.

    Returns
    -------
    int
        The previous Numba thread count.
    """
    n = check_thread_count(n, numba.config.NUMBA_NUM_THREADS)
    previous = numba.get_num_threads()
    numba.set_num_threads(n)
    set_blas_threads(n)
    return previous


def get_num_threads() -> tuple[int, int | None]:
    """(Numba threads, BLAS threads) in use; BLAS is None where it cannot be read."""
    return numba.get_num_threads(), blas_threads()
