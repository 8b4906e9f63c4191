"""BLAS gemm and gemv with alpha and beta, callable from ``@njit`` code.

Why not ``np.dot`` inside ``@njit``: it fixes alpha = 1 and beta = 0, so it
cannot accumulate into an existing output.

Why NumPy's BLAS: Numba's own BLAS wrappers reach SciPy's bundled OpenBLAS,
a second library with its own thread pool beside the one NumPy uses.  Every
program that runs numba_lora also runs NumPy products, and two OpenBLAS pools
that take turns on the same cores spin against each other: measured on 2
cores, 4096 x 4096 float32, a batch-512 product alternating between the two
libraries took 1.8x as long as either alone.  So the kernels call the CBLAS
entry points of the OpenBLAS that NumPy itself loaded (``scipy_cblas_sgemm64_``
and friends in NumPy >= 2 wheels: row-major CBLAS, 64-bit integers).

The kernels call four fixed symbol names (``numba_lora_cblas_sgemm``, ...)
with one fixed ABI, registered with LLVM at import.  Because the name, not an
address, is compiled in, ``cache=True`` works, and a cache stays valid when
the library behind the names changes.  Where NumPy's BLAS cannot be found
(NumPy built against MKL or Accelerate, say), the names are bound to small
ctypes adapters that do the same arithmetic with NumPy's ``matmul``: correct,
a few microseconds slower per call.  :data:`PROVIDER` says which is in use;
``NUMBA_LORA_BLAS=numpy-matmul`` forces the adapters.

Two more names, ``numba_lora_blas_get_threads`` and
``numba_lora_blas_set_threads``, reach OpenBLAS's thread count from
``@njit`` code (``_blas_get_threads`` / ``_blas_set_threads``); where the
count cannot be set they are bound to adapters whose getter answers -1, and
compiled code checks that at run time.
"""

import ctypes
import glob
import os

import numpy as np
from llvmlite import binding as llvm
from numba import njit, types

from .._config import JIT_OPTIONS
from ..errors import LoraShapeError
from ._guard import guarded

CBLAS_ROW_MAJOR = 101
CBLAS_NO_TRANS = 111
CBLAS_TRANS = 112

_int = ctypes.c_int
_i64 = ctypes.c_int64
_vp = ctypes.c_void_p


def _gemm_proto(real):
    return ctypes.CFUNCTYPE(None, _int, _int, _int, _i64, _i64, _i64, real, _vp, _i64,
                            _vp, _i64, real, _vp, _i64)


def _gemv_proto(real):
    return ctypes.CFUNCTYPE(None, _int, _int, _i64, _i64, real, _vp, _i64, _vp, _i64,
                            real, _vp, _i64)


_PROTOS = {
    "sgemm": _gemm_proto(ctypes.c_float),
    "dgemm": _gemm_proto(ctypes.c_double),
    "sgemv": _gemv_proto(ctypes.c_float),
    "dgemv": _gemv_proto(ctypes.c_double),
}
_DTYPES = {"s": np.float32, "d": np.float64}


def _numpy_openblas_candidates():
    root = os.path.dirname(np.__file__)
    patterns = [
        os.path.join(root + ".libs", "*openblas*"),  # Linux and Windows wheels
        os.path.join(root, ".dylibs", "*openblas*"),  # macOS wheels
    ]
    for pattern in patterns:
        yield from sorted(glob.glob(pattern))


def _find_numpy_cblas():
    """(path, library, {name: address}) of NumPy's ILP64 CBLAS gemm/gemv, or None."""
    for path in _numpy_openblas_candidates():
        try:
            lib = ctypes.CDLL(path)  # already loaded by NumPy: same handle
        except OSError:
            continue
        for prefix, suffix in (("scipy_cblas_", "64_"), ("cblas_", "64_")):
            try:
                found = {
                    name: ctypes.cast(getattr(lib, f"{prefix}{name}{suffix}"), _vp).value
                    for name in _PROTOS
                }
            except AttributeError:
                continue
            return path, lib, found
    return None


def _as_array(ptr, rows, cols, ld, dtype):
    """A (rows, cols) row-major view with leading dimension ``ld`` of raw memory."""
    if rows == 0 or cols == 0:
        return np.zeros((rows, cols), dtype)
    n = (rows - 1) * ld + cols
    buf = (ctypes.c_char * (n * np.dtype(dtype).itemsize)).from_address(ptr)
    flat = np.frombuffer(buf, dtype=dtype, count=n)
    return np.lib.stride_tricks.as_strided(
        flat, (rows, cols), (ld * flat.itemsize, flat.itemsize))


def _fallback_gemm(kind):
    dtype = _DTYPES[kind]

    def gemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        A = _as_array(a, *((m, k) if ta == CBLAS_NO_TRANS else (k, m)), lda, dtype)
        B = _as_array(b, *((k, n) if tb == CBLAS_NO_TRANS else (n, k)), ldb, dtype)
        C = _as_array(c, m, n, ldc, dtype)
        A = A if ta == CBLAS_NO_TRANS else A.T
        B = B if tb == CBLAS_NO_TRANS else B.T
        product = alpha * (A @ B)
        C[...] = product if beta == 0 else product + beta * C

    return gemm


def _fallback_gemv(kind):
    dtype = _DTYPES[kind]

    def gemv(order, trans, m, n, alpha, a, lda, x, incx, beta, y, incy):
        A = _as_array(a, m, n, lda, dtype)
        A = A if trans == CBLAS_NO_TRANS else A.T
        X = _as_array(x, A.shape[1], 1, incx, dtype)[:, 0]
        Y = _as_array(y, A.shape[0], 1, incy, dtype)[:, 0]
        product = alpha * (A @ X)
        Y[...] = product if beta == 0 else product + beta * Y

    return gemv


_KEEP_ALIVE = []  # ctypes callbacks must outlive every call


_THREAD_CONTROL = {}


def _thread_control(lib):
    for prefix, suffix in (("scipy_openblas_", "64_"), ("openblas_", "64_"), ("openblas_", "")):
        try:
            setter = getattr(lib, f"{prefix}set_num_threads{suffix}")
            getter = getattr(lib, f"{prefix}get_num_threads{suffix}")
        except AttributeError:
            continue
        setter.argtypes, setter.restype = [ctypes.c_int], None
        getter.argtypes, getter.restype = [], ctypes.c_int
        return {"set": setter, "get": getter}
    return {}


def blas_threads():
    """Threads of the BLAS the kernels call, or None where that cannot be read."""
    if "get" in _THREAD_CONTROL:
        return _THREAD_CONTROL["get"]()
    return None


def set_blas_threads(n):
    """Set the thread count of the BLAS the kernels call (NumPy's); False if not possible."""
    if "set" in _THREAD_CONTROL:
        _THREAD_CONTROL["set"](int(n))
        return True
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return False
    threadpool_limits(limits=int(n), user_api="blas")
    return True


def _register():
    # NUMBA_LORA_BLAS=numpy-matmul forces the ctypes adapters (for testing
    # them, or to rule NumPy's OpenBLAS out when chasing a problem).
    forced = os.environ.get("NUMBA_LORA_BLAS", "") == "numpy-matmul"
    found = None if forced else _find_numpy_cblas()
    if found is not None:
        path, lib, addresses = found
        _THREAD_CONTROL.update(_thread_control(lib))
        provider = f"numpy's OpenBLAS ({os.path.basename(path)})"
    else:
        addresses = {}
        for name, proto in _PROTOS.items():
            make = _fallback_gemm if name.endswith("gemm") else _fallback_gemv
            callback = proto(make(name[0]))
            _KEEP_ALIVE.append(callback)
            addresses[name] = ctypes.cast(callback, _vp).value
        provider = "numpy.matmul through ctypes adapters (NumPy's BLAS not found)"
    for name, address in addresses.items():
        llvm.add_symbol(f"numba_lora_cblas_{name}", address)
    _register_thread_control()
    return provider


# Thread control from @njit code: the same two names whatever the BLAS.  With
# no thread control (not OpenBLAS, or the ctypes adapters in use) the getter
# answers -1 and the setter does nothing, so compiled code decides at run time
# (a cache stays valid when the library behind the names changes).
_GET_PROTO = ctypes.CFUNCTYPE(ctypes.c_int)
_SET_PROTO = ctypes.CFUNCTYPE(None, ctypes.c_int)


def _register_thread_control():
    if "get" in _THREAD_CONTROL:
        get = ctypes.cast(_THREAD_CONTROL["get"], _vp).value
        set_ = ctypes.cast(_THREAD_CONTROL["set"], _vp).value
    else:
        callbacks = (_GET_PROTO(lambda: -1), _SET_PROTO(lambda n: None))
        _KEEP_ALIVE.extend(callbacks)
        get, set_ = (ctypes.cast(c, _vp).value for c in callbacks)
    llvm.add_symbol("numba_lora_blas_get_threads", get)
    llvm.add_symbol("numba_lora_blas_set_threads", set_)


#: Which BLAS the kernels call.
PROVIDER = _register()


def _gemm_ext(real):
    return types.ExternalFunction(
        f"numba_lora_cblas_{'s' if real == types.float32 else 'd'}gemm",
        types.void(types.intc, types.intc, types.intc, types.int64, types.int64, types.int64,
                   real, types.voidptr, types.int64, types.voidptr, types.int64,
                   real, types.voidptr, types.int64),
    )


def _gemv_ext(real):
    return types.ExternalFunction(
        f"numba_lora_cblas_{'s' if real == types.float32 else 'd'}gemv",
        types.void(types.intc, types.intc, types.int64, types.int64, real, types.voidptr,
                   types.int64, types.voidptr, types.int64, real, types.voidptr, types.int64),
    )


#: From @njit code: the BLAS's thread count, or -1 where it cannot be read or set.
_blas_get_threads = types.ExternalFunction("numba_lora_blas_get_threads", types.intc())
#: From @njit code: set the BLAS's thread count (does nothing where the getter answers -1).
_blas_set_threads = types.ExternalFunction("numba_lora_blas_set_threads",
                                           types.void(types.intc))

_sgemm = _gemm_ext(types.float32)
_dgemm = _gemm_ext(types.float64)
_sgemv = _gemv_ext(types.float32)
_dgemv = _gemv_ext(types.float64)


@njit(**JIT_OPTIONS)
def _scale(beta, c):
    """c = beta * c, with beta == 0 writing zeros (as BLAS does) even over NaN."""
    # Element by element through the array's own indexing (no reshape, which
    # Numba cannot type for a non-contiguous layout).
    for index in np.ndindex(c.shape):
        c[index] = beta * c[index] if beta != 0 else 0


@njit(**JIT_OPTIONS)
def _gemm(trans_b, alpha, a, b, beta, c):
    """c = alpha * a @ op(b) + beta * c, op(b) = b.T if trans_b else b.

    Checks every shape and C-contiguity before BLAS sees a pointer, so that
    no call can read or write outside the arrays (dtypes and ndims were
    checked when the call was compiled; see ``_guard``).
    """
    m, k = a.shape
    n = c.shape[1]
    if c.shape[0] != m:
        raise LoraShapeError("gemm: c must have as many rows as a")
    if trans_b:
        if b.shape[0] != n or b.shape[1] != k:
            raise LoraShapeError("gemm: b must be (n, k) for c = a @ b.T")
    elif b.shape[0] != k or b.shape[1] != n:
        raise LoraShapeError("gemm: b must be (k, n) for c = a @ b")
    if not (a.flags.c_contiguous and b.flags.c_contiguous and c.flags.c_contiguous):
        raise LoraShapeError("gemm: a, b and c must be C-contiguous")
    if m == 0 or n == 0:
        return
    if k == 0:
        _scale(beta, c)
        return
    tb = CBLAS_TRANS if trans_b else CBLAS_NO_TRANS
    ldb = b.shape[1]
    if c.itemsize == 4:
        _sgemm(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, tb, m, n, k, np.float32(alpha),
               a.ctypes, k, b.ctypes, ldb, np.float32(beta), c.ctypes, n)
    else:
        _dgemm(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, tb, m, n, k, np.float64(alpha),
               a.ctypes, k, b.ctypes, ldb, np.float64(beta), c.ctypes, n)


@njit(**JIT_OPTIONS)
def _gemm_nt(alpha, a, b, beta, c):
    _gemm(True, alpha, a, b, beta, c)


@njit(**JIT_OPTIONS)
def _gemm_nn(alpha, a, b, beta, c):
    _gemm(False, alpha, a, b, beta, c)


@njit(**JIT_OPTIONS)
def _gemv_n(alpha, a, x, beta, y):
    m, k = a.shape
    if x.shape[0] != k or y.shape[0] != m:
        raise LoraShapeError("gemv: x must be (k,) and y (m,) for y = a @ x with a (m, k)")
    if not (a.flags.c_contiguous and x.flags.c_contiguous and y.flags.c_contiguous):
        raise LoraShapeError("gemv: a, x and y must be C-contiguous")
    if m == 0:
        return
    if k == 0:
        _scale(beta, y)
        return
    if y.itemsize == 4:
        _sgemv(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, m, k, np.float32(alpha), a.ctypes, k,
               x.ctypes, 1, np.float32(beta), y.ctypes, 1)
    else:
        _dgemv(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, m, k, np.float64(alpha), a.ctypes, k,
               x.ctypes, 1, np.float64(beta), y.ctypes, 1)


_GEMM = (("alpha", "real"), ("a", "f2"), ("b", "f2"), ("beta", "real"), ("c", "f2w"))

#: ``c = alpha * a @ b.T + beta * c`` for a (m, k), b (n, k), c (m, n); from @njit code.
gemm_nt = guarded("gemm_nt", _GEMM, _gemm_nt)

#: ``c = alpha * a @ b + beta * c`` for a (m, k), b (k, n), c (m, n); from @njit code.
gemm_nn = guarded("gemm_nn", _GEMM, _gemm_nn)

#: ``y = alpha * a @ x + beta * y`` for a (m, k), x (k,), y (m,); from @njit code.
gemv_n = guarded("gemv_n", (("alpha", "real"), ("a", "f2"), ("x", "f1"), ("beta", "real"),
                            ("y", "f1w")), _gemv_n)
