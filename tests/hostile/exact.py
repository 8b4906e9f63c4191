"""References for the hostile cases: exact merge arithmetic, forward products in float64.

Values are not validated by numba_lora (NaN in, NaN out), so the forward
comparison is strict only where it can be: an output element is compared
(within ``reference.RTOL`` of its magnitude) when every term that makes it up,
and every intermediate the kernels round to the dtype, is finite and well
inside the dtype's range; elsewhere (a NaN, an infinity or an overflow among
its terms) any value is accepted.  Merges are compared bit for bit with the
promised per-element order (see ``numba_lora.kernels.merge``), NaN equal to
NaN.
"""

import numpy as np

import reference as ref

__all__ = ["rounded_scaling", "exact_update", "nonfinite", "check_forward", "check_multi",
           "same_bits"]

_FMA = ref._FMA  # C's fma/fmaf, bound with ctypes in reference.py
CHAIN_MAX_RANK = 192


def rounded_scaling(scaling, dtype):
    """``scaling`` as the kernels apply it: rounded once to ``dtype``, as a float."""
    with np.errstate(all="ignore"):
        return float(np.dtype(dtype).type(scaling))


def exact_update(W, A, B, scaling, sign):
    """``W + sign * delta`` rounded exactly as ``kernels.merge``/``unmerge`` promise.

    Per element: ``p`` the fma chain over k from +0 (-0 at rank 1; +0 and no
    step at rank 0; blocks above rank 192), ``delta = p * s`` with ``s`` the
    scaling rounded to W's dtype, then ``W + delta`` (or ``W - delta``).
    """
    dtype = np.dtype(W.dtype)
    t = dtype.type
    fma = _FMA[dtype]
    with np.errstate(all="ignore"):
        s = t(scaling)
        rank = A.shape[0]
        block = rank if rank <= CHAIN_MAX_RANK else min(CHAIN_MAX_RANK, rank // 2)
        out = np.array(W, dtype=dtype, copy=True)
        Af = [[float(v) for v in row] for row in A]
        for i in range(W.shape[0]):
            b = [float(v) for v in B[i]]
            for j in range(W.shape[1]):
                if rank == 0:
                    total = t(0.0)
                else:
                    total = None
                    for k0 in range(0, rank, block):
                        p = -0.0 if rank == 1 else 0.0
                        for k in range(k0, min(rank, k0 + block)):
                            p = fma(b[k], Af[k][j], p)
                        total = t(p) if total is None else t(total + t(p))
                delta = t(total * s)
                out[i, j] = W[i, j] + delta if sign > 0 else W[i, j] - delta
    return out


def nonfinite(array):
    """How many elements are NaN or infinite."""
    return int(np.count_nonzero(~np.isfinite(array)))


def same_bits(actual, expected):
    """Same dtype, shape and bits, except that any NaN equals any NaN."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return False
    if actual.size == 0:
        return True
    bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[actual.itemsize]
    equal = actual.view(bits) == expected.view(bits)
    both_nan = np.isnan(actual) & np.isnan(expected)
    return bool(np.all(equal | both_nan))


def _strict_mask(dtype, *magnitudes):
    """Elements whose every magnitude is finite and well inside ``dtype``'s range."""
    limit = float(np.finfo(dtype).max) / 64
    mask = None
    for m in magnitudes:
        ok = np.isfinite(m) & (m <= limit)
        mask = ok if mask is None else mask & ok
    return mask


def _compare(actual, expected, magnitude, strict, dtype, n_terms, extra=0.0):
    actual = np.asarray(actual)
    if actual.dtype != np.dtype(dtype):
        raise AssertionError(f"result has dtype {actual.dtype}, expected {np.dtype(dtype)}")
    if actual.shape != expected.shape:
        raise AssertionError(f"result has shape {actual.shape}, expected {expected.shape}")
    a = actual.astype(np.float64)
    tol = (ref.RTOL[np.dtype(dtype)] * magnitude + (n_terms + 1) * float(np.finfo(dtype).tiny)
           + extra)
    with np.errstate(all="ignore"):
        bad = strict & ~(np.abs(a - expected) <= tol)
    if bad.any():
        idx = tuple(np.argwhere(bad)[0])
        raise AssertionError(
            f"{int(bad.sum())} of {bad.size} checked elements off; first at {list(idx)}: "
            f"got {a[idx]!r}, expected {expected[idx]!r} (tolerance {tol[idx]:.3g})")


def _f64(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def lowrank_skipped(scaling, rank, dtype):
    """Whether the kernels skip the low-rank term (scaling 0, or 0 once rounded, or rank 0)."""
    return scaling == 0 or rank == 0 or rounded_scaling(scaling, dtype) == 0


def check_forward(actual, W, A, B, scaling, X, dtype):
    """Check ``actual`` (one vector or a batch) against ``W x + s B (A x)`` in float64."""
    dtype = np.dtype(dtype)
    W, A, B, X = _f64(W, A, B, X)
    with np.errstate(all="ignore"):
        y = X @ W.T
        mag = np.abs(X) @ np.abs(W).T
        mags = [mag]
        extra = 0.0
        if not lowrank_skipped(scaling, A.shape[0], dtype):
            s = rounded_scaling(scaling, dtype)
            t = X @ A.T
            tmag = np.abs(X) @ np.abs(A).T
            low = t @ B.T
            lowmag = tmag @ np.abs(B).T
            y = y + s * low
            mag = mag + abs(s) * lowmag
            # Intermediates the kernels round to the dtype must not overflow.
            tmax = tmag.max(axis=-1, keepdims=True)  # rank >= 1 here
            mags += [mag, lowmag, tmax * np.ones_like(mag), abs(s) * np.ones_like(mag)]
            # t = A x is rounded to the dtype: where it is subnormal, its
            # absolute error (up to tiny per term) is scaled up by s B.
            extra = abs(s) * np.abs(B).sum(axis=1) * (W.shape[1] + 1) * float(
                np.finfo(dtype).tiny)
        strict = _strict_mask(dtype, *mags)
    _compare(actual, y, mag, strict, dtype, W.shape[1] + A.shape[0], extra)


def check_multi(actual, W, adapters, X, ids, dtype):
    """Check a multi-adapter batch: ``adapters[i] = (A_i, B_i, scaling_i)`` for row ids >= 0."""
    dtype = np.dtype(dtype)
    actual = np.asarray(actual)
    if actual.shape != (X.shape[0], W.shape[0]):
        raise AssertionError(f"result has shape {actual.shape}, expected "
                             f"{(X.shape[0], W.shape[0])}")
    for row, i in enumerate(ids):
        if i < 0:
            A = np.zeros((0, W.shape[1]))
            B = np.zeros((W.shape[0], 0))
            s = 0.0
        else:
            A, B, s = adapters[i]
        try:
            check_forward(actual[row], W, A, B, s, X[row], dtype)
        except AssertionError as exc:
            raise AssertionError(f"row {row} (adapter {i}): {exc}") from None
