"""numba_lora.set_num_threads drives Numba and the kernels' BLAS together."""

import numba
import pytest

import numba_lora


def test_set_and_get_num_threads():
    before = numba_lora.get_num_threads()
    try:
        previous = numba_lora.set_num_threads(1)
        assert previous == before[0]
        numba_threads, blas_threads = numba_lora.get_num_threads()
        assert numba_threads == 1 == numba.get_num_threads()
        assert blas_threads in (1, None)  # None where the BLAS cannot be asked
    finally:
        numba_lora.set_num_threads(before[0])
        if before[1] is not None:
            from numba_lora.kernels._blas import set_blas_threads

            set_blas_threads(before[1])
    assert numba_lora.get_num_threads() == before


@pytest.mark.parametrize("n", [0, numba.config.NUMBA_NUM_THREADS + 1])
def test_out_of_range_thread_counts(n):
    with pytest.raises(ValueError, match="n must be between 1 and NUMBA_NUM_THREADS"):
        numba_lora.set_num_threads(n)
