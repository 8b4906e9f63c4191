"""How-to: call the kernels from your own @njit code."""
import numpy as np
from numba import njit, prange

from numba_lora import LoraDtypeError, kernels


@njit
def two_layers(W1, A1, B1, W2, A2, B2, scaling, X):
    """Two adapted layers with a ReLU between, without leaving compiled code."""
    H = np.empty((X.shape[0], W1.shape[0]), dtype=X.dtype)
    kernels.forward_batch(W1, A1, B1, scaling, X, H)
    H = np.maximum(H, 0)
    out = np.empty((X.shape[0], W2.shape[0]), dtype=X.dtype)
    return kernels.forward_batch(W2, A2, B2, scaling, H, out)


@njit(parallel=True)
def merge_every_layer(Ws, As, Bs, scaling):
    """One layer per thread: merge_serial, since merge itself is threaded."""
    for k in prange(Ws.shape[0]):
        kernels.merge_serial(Ws[k], As[k], Bs[k], scaling)


rng = np.random.default_rng(0)
for dtype in (np.float32, np.float64):   # every kernel takes both
    W1 = rng.standard_normal((64, 32)).astype(dtype)
    A1 = rng.standard_normal((4, 32)).astype(dtype)
    B1 = rng.standard_normal((64, 4)).astype(dtype)
    W2 = rng.standard_normal((16, 64)).astype(dtype)
    A2 = rng.standard_normal((4, 64)).astype(dtype)
    B2 = rng.standard_normal((16, 4)).astype(dtype)
    X = rng.standard_normal((8, 32)).astype(dtype)
    Y = two_layers(W1, A1, B1, W2, A2, B2, 0.5, X)
    H = np.maximum(X @ (W1 + 0.5 * B1 @ A1).T, 0)
    assert np.allclose(Y, H @ (W2 + 0.5 * B2 @ A2).T, rtol=1e-3, atol=1e-3)

    Ws = rng.standard_normal((6, 64, 32)).astype(dtype)   # six layers of one shape
    As = rng.standard_normal((6, 4, 32)).astype(dtype)
    Bs = rng.standard_normal((6, 64, 4)).astype(dtype)
    expected = Ws + 0.5 * Bs @ As
    merge_every_layer(Ws, As, Bs, 0.5)
    assert np.allclose(Ws, expected, rtol=1e-5, atol=1e-5)

# Wrong arguments are refused when Numba compiles the call, naming the kernel
# and the argument, from your code as from Python:
try:
    two_layers(W1, A1, B1, W2, A2, B2, 0.5, X.astype(np.float32))
    raise AssertionError("not refused")
except LoraDtypeError as exc:
    print(exc)
