"""BLAS gemm and gemv callable from ``@njit`` code, with alpha and beta.

``np.dot`` inside ``@njit`` fixes alpha = 1 and beta = 0, so it cannot
accumulate into an existing output.  Numba ships C wrappers
(``numba_xxgemm``, ``numba_xxgemv``) around SciPy's ``cython_blas`` that take
both; they are resolved by symbol name, so code calling them can still be
cached with ``cache=True`` (a ctypes function pointer could not).

BLAS is column-major.  A C-contiguous ``(rows, cols)`` array is, to BLAS, the
column-major ``(cols, rows)`` matrix with leading dimension ``cols``; the
helpers below take C-contiguous arrays and do that translation once.
"""

import numpy as np
from numba import njit, types
from numba.np.linalg import ensure_blas

ensure_blas()  # a clear error at import when SciPy's BLAS is missing

_xxgemm = types.ExternalFunction(
    "numba_xxgemm",
    types.intc(
        types.char, types.char, types.char,  # kind, transa, transb
        types.intp, types.intp, types.intp,  # m, n, k
        types.voidptr, types.voidptr, types.intp,  # alpha, a, lda
        types.voidptr, types.intp,  # b, ldb
        types.voidptr, types.voidptr, types.intp,  # beta, c, ldc
    ),
)

_xxgemv = types.ExternalFunction(
    "numba_xxgemv",
    types.intc(
        types.char, types.char,  # kind, trans
        types.intp, types.intp,  # m, n
        types.voidptr, types.voidptr, types.intp,  # alpha, a, lda
        types.voidptr, types.voidptr, types.voidptr,  # x, beta, y
    ),
)

_N = ord("n")
_T = ord("t")


@njit(cache=True, nogil=True, inline="always")
def _kind(a):
    return ord("s") if a.itemsize == 4 else ord("d")


@njit(cache=True, nogil=True)
def gemm_nt(alpha, a, b, beta, c):
    """``c = alpha * a @ b.T + beta * c`` for C-contiguous 2-D arrays.

    a (m, k), b (n, k), c (m, n), one dtype (float32 or float64).
    """
    m, k = a.shape
    n = b.shape[0]
    if m == 0 or n == 0:
        return
    if k == 0:
        # BLAS would leave c untouched only for beta == 1; be exact.
        for i in range(m):
            for j in range(n):
                c[i, j] = beta * c[i, j] if beta != 0 else 0
        return
    scalars = np.empty(2, dtype=c.dtype)
    scalars[0] = alpha
    scalars[1] = beta
    # Row-major c = a b^T is column-major c^T = b a^T: BLAS "A" is b
    # (k x n column-major, transposed), BLAS "B" is a (k x m, not transposed).
    r = _xxgemm(
        _kind(c), _T, _N, n, m, k,
        scalars[0:].ctypes, b.ctypes, k,
        a.ctypes, k,
        scalars[1:].ctypes, c.ctypes, n,
    )
    if r != 0:
        raise RuntimeError("BLAS gemm failed")


@njit(cache=True, nogil=True)
def gemv_n(alpha, a, x, beta, y):
    """``y = alpha * a @ x + beta * y`` for C-contiguous a (m, k), x (k,), y (m,)."""
    m, k = a.shape
    if m == 0:
        return
    if k == 0:
        for i in range(m):
            y[i] = beta * y[i] if beta != 0 else 0
        return
    scalars = np.empty(2, dtype=y.dtype)
    scalars[0] = alpha
    scalars[1] = beta
    # Row-major a (m, k) is column-major a^T (k x m): y = (a^T)^T x.
    r = _xxgemv(
        _kind(y), _T, k, m,
        scalars[0:].ctypes, a.ctypes, k,
        x.ctypes, scalars[1:].ctypes, y.ctypes,
    )
    if r != 0:
        raise RuntimeError("BLAS gemv failed")
