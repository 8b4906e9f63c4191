"""One thread count for everything numba_lora runs."""

from __future__ import annotations

import numba

from ._validate import check_thread_count
from .kernels._blas import blas_threads, set_blas_threads

__all__ = ["set_num_threads", "get_num_threads"]


def set_num_threads(n: int) -> int:
    """Use ``n`` threads in Numba and in the BLAS the kernels call.

    ``forward``, ``forward_batch`` and the dense part of the multi-adapter
    kernels run on the BLAS that NumPy uses (and so do your own NumPy
    products); ``merge``, ``unmerge`` and ``count_nonfinite_merged`` run
    on Numba's threads.  Setting both to the same number keeps them from
    oversubscribing the cores.  Numba's count is per Python thread, like
    ``numba.set_num_threads``; BLAS's is process-wide.

    Parameters
    ----------
    n : int
        Between 1 and ``numba.config.NUMBA_NUM_THREADS``.

    Returns
    -------
    int
        The previous Numba thread count.

    Raises
    ------
    LoraTypeError, LoraConfigError
        If ``n`` is not an int, or out of range.

    See Also
    --------
    get_num_threads : The counts in use.
    numba.set_num_threads : Numba's count alone.

    Examples
    --------
    >>> import numba_lora
    >>> previous = numba_lora.set_num_threads(1)
    >>> numba_lora.get_num_threads()[0]
    1
    >>> _ = numba_lora.set_num_threads(previous)
    """
    n = check_thread_count(n, numba.config.NUMBA_NUM_THREADS)
    previous = numba.get_num_threads()
    numba.set_num_threads(n)
    set_blas_threads(n)
    return previous


def get_num_threads() -> tuple[int, int | None]:
    """(Numba threads, BLAS threads) in use; BLAS is None where it cannot be read.

    Numba's count is the calling thread's; BLAS's is the process's.

    Returns
    -------
    tuple of (int, int or None)
        Numba's thread count, and the BLAS's (None when the BLAS library
        does not say).

    See Also
    --------
    set_num_threads : Sets both.

    Examples
    --------
    >>> import numba_lora
    >>> numba_threads, blas_threads = numba_lora.get_num_threads()
    >>> numba_threads >= 1
    True
    """
    return numba.get_num_threads(), blas_threads()
