"""Slow, obviously correct float64 references for every operation, and the tolerances.

Each reference works in float64 on the float values it is given.  A result
in dtype ``d`` passes when every element is within ``RTOL[d]`` times the sum
of the absolute values of the terms that make it up (a bound that holds for
any summation order, so it does not depend on how BLAS blocks the sums).
"""

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
