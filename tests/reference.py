"""Slow, obviously correct float64 references for every operation, and the tolerances.

Each reference works in float64 on the float values it is given.  A result
in dtype ``d`` passes when every element is within ``RTOL[d]`` times the sum
of the absolute values of the terms that make it up (a bound that holds for
any summation order, so it does not depend on how BLAS blocks the sums).
"""

import ctypes
import ctypes.util

import numpy as np

#: Tolerance relative to the magnitude of the terms, written once per dtype.
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-13}
DTYPES = (np.float32, np.float64)


def f64(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def forward(W, A, B, scaling, x):
    """(y, magnitude) for one vector or a (batch, in_features) array."""
    W, A, B, x = f64(W, A, B, x)
    y = x @ W.T + scaling * (x @ A.T) @ B.T
    magnitude = np.abs(x) @ np.abs(W).T + abs(scaling) * (np.abs(x) @ np.abs(A).T) @ np.abs(B).T
    return y, magnitude


def merged(W, A, B, scaling, sign=1.0):
    """(W + sign * scaling * B @ A, magnitude)."""
    W, A, B = f64(W, A, B)
    delta = scaling * B @ A
    return W + sign * delta, np.abs(W) + abs(scaling) * np.abs(B) @ np.abs(A)


def assert_close(actual, expected, magnitude, dtype):
    actual = np.asarray(actual, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    tol = RTOL[np.dtype(dtype)] * magnitude + np.finfo(dtype).tiny
    err = np.abs(actual - expected)
    bad = err > tol
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} elements off; worst error {err.max():.3e}, "
        f"tolerance there {tol.flat[np.argmax(err - tol)]:.3e}"
    )


def random_lora(rng, out_features, in_features, rank, dtype, b_scale=1.0):
    """W, A, B as C-contiguous arrays of ``dtype`` with a non-zero B."""
    W = rng.standard_normal((out_features, in_features)).astype(dtype)
    A = rng.uniform(-1, 1, (rank, in_features)).astype(dtype)
    B = (b_scale * rng.standard_normal((out_features, rank))).astype(dtype)
    return W, A, B


def assert_bitwise_equal(actual, expected):
    """Same shape, dtype and bits (so -0.0 != +0.0 and NaN payloads count)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    bits = {4: np.uint32, 8: np.uint64, 2: np.uint16}[actual.itemsize]
    differ = actual.view(bits) != expected.view(bits)
    assert not differ.any(), (
        f"{differ.sum()} of {differ.size} elements differ in their bits, first at "
        f"{np.argwhere(differ)[0].tolist()}"
    )


_LIBM = ctypes.CDLL(ctypes.util.find_library("m"))
_FMA = {np.dtype(np.float32): _LIBM.fmaf, np.dtype(np.float64): _LIBM.fma}
for _dtype, _fn in _FMA.items():
    _c = ctypes.c_float if _dtype == np.float32 else ctypes.c_double
    _fn.argtypes, _fn.restype = [_c, _c, _c], _c


def merged_exact(W, A, B, scaling, sign):
    """The merge (sign +1) or unmerge (-1) rounded exactly as promised, with C's fma.

    Per element: ``p = fma(B[i, k], A[k, j], p)`` for k ascending from p = +0
    (-0 at rank 1; above rank 192 over blocks of k, the block sums added),
    ``delta = p * s`` with s the scaling rounded to the dtype, then ``W + delta``
    (or ``W - delta``), every step rounded to the dtype.  Slow: small arrays.
    """
    dtype = np.dtype(W.dtype)
    fma, t = _FMA[dtype], dtype.type
    s = t(scaling)
    rank = A.shape[0]
    # Rank 1: the plain product (a chain from -0.0); above 192: chains over
    # blocks of k, added in order (torch's CPU matmul, which PEFT calls).
    block = rank if rank <= 192 else min(192, rank // 2)
    out = W.copy()
    for i in range(W.shape[0]):
        for j in range(W.shape[1]):
            total = None
            for k0 in range(0, rank, block):
                p = t(-0.0) if rank == 1 else t(0.0)
                for k in range(k0, min(rank, k0 + block)):
                    p = t(fma(B[i, k], A[k, j], p))
                total = p if total is None else t(total + p)
            delta = t(total * s)
            out[i, j] = W[i, j] + delta if sign > 0 else W[i, j] - delta
    return out
