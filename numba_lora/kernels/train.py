"""Training kernels: the forward that keeps what backward needs, the backward, AdamW, SGD.

For one adapted linear layer with frozen ``W``::

    Y  = X W^T + s H B^T,        H = Xl A^T      (Xl: the LoRA branch's input)
    dB = s dY^T H                (out_features, rank)
    dA = s (dY B)^T Xl           (rank, in_features)
    dX = dY W + s (dY B) A * D   (batch, in_features)

where ``Xl = X`` without dropout and ``Xl = X * D`` with PEFT's LoRA dropout,
``D = mask * keep_scale`` (``keep_scale = 1 / (1 - p)``): dropout acts on the
LoRA branch only, and the masks are drawn by the caller (from a seedable
generator), never inside a kernel.  Without dropout the caller passes ``X``
itself as ``XL``: that path costs nothing extra.

Layout as in :mod:`numba_lora.kernels.lora`: every public kernel is a thin
``@njit`` function over a guarded body (argument types are checked when the
call is compiled); shapes, contiguity and scalar ranges are checked when it
runs, before any array is touched.  The products are BLAS calls (NumPy's
OpenBLAS, see ``_blas``) made outside any ``prange``; the optimizer updates
are element-wise loops on Numba's threads, with ``*_serial`` twins for a
caller's own ``prange``.

The optimizer kernels round exactly as written (``EXACT_OPTIONS``: no
fastmath) and follow the order of torch's single-tensor CPU implementation
(``torch.optim.AdamW(foreach=False)``, which is torch's default for CPU
tensors), step by step; see :func:`adamw_step`.
"""

import numpy as np
from numba import njit, prange

from .._config import EXACT_OPTIONS, JIT_OPTIONS
from ..errors import LoraConfigError, LoraShapeError
from ._blas import gemm_nn, gemm_nt
from ._guard import fma, guarded

__all__ = [
    "forward_train",
    "apply_dropout",
    "backward",
    "backward_dropout",
    "backward_factors",
    "adamw_step",
    "adamw_step_serial",
    "sgd_step",
    "sgd_step_serial",
]

#: Elements per task of the parallel optimizer loops (16 KiB of float32 per
#: array: the arrays of a task stay in L1/L2 while it runs).
CHUNK = 4096


# ----------------------------------------------------------------- checks
@njit(**JIT_OPTIONS)
def _check_factors(W, A, B):
    out_features, in_features = W.shape
    if A.shape[1] != in_features:
        raise LoraShapeError("A must be (rank, in_features): A.shape[1] != W.shape[1]")
    if B.shape[0] != out_features:
        raise LoraShapeError("B must be (out_features, rank): B.shape[0] != W.shape[0]")
    if B.shape[1] != A.shape[0]:
        raise LoraShapeError("rank mismatch: B.shape[1] != A.shape[0]")
    if not (W.flags.c_contiguous and A.flags.c_contiguous and B.flags.c_contiguous):
        raise LoraShapeError("W, A and B must be C-contiguous")


@njit(**JIT_OPTIONS)
def _check_rows(name, array, rows, cols):
    if array.shape[0] != rows or array.shape[1] != cols:
        raise LoraShapeError(name)
    if not array.flags.c_contiguous:
        raise LoraShapeError("every array must be C-contiguous")


@njit(**JIT_OPTIONS)
def _check_backward(out_features, in_features, rank, XL, H, dY, dA, dB):
    batch = dY.shape[0]
    _check_rows("dY must be (batch, out_features)", dY, batch, out_features)
    _check_rows("XL must be (batch, in_features), batch = dY.shape[0]", XL, batch, in_features)
    _check_rows("H must be (batch, rank), batch = dY.shape[0]", H, batch, rank)
    _check_rows("dA must be (rank, in_features)", dA, rank, in_features)
    _check_rows("dB must be (out_features, rank)", dB, out_features, rank)
    return batch


@njit(**EXACT_OPTIONS)
def _check_keep(keep_scale):
    # Written so that NaN fails too (no fastmath here: see _config).
    if not (keep_scale >= 1.0 and keep_scale < np.inf):
        raise LoraConfigError("keep_scale must be 1 / (1 - p) for a dropout p in [0, 1): "
                              "finite and >= 1")


# ---------------------------------------------------------------- forward
@njit(**JIT_OPTIONS)
def _forward_train(W, A, B, scaling, X, XL, Y, H):
    _check_factors(W, A, B)
    out_features, in_features = W.shape
    rank = A.shape[0]
    batch = X.shape[0]
    _check_rows("X must be (batch, in_features)", X, batch, in_features)
    _check_rows("XL must have X's shape (batch, in_features)", XL, batch, in_features)
    _check_rows("Y must be (batch, out_features)", Y, batch, out_features)
    _check_rows("H must be (batch, rank)", H, batch, rank)
    if batch == 0:
        return Y
    gemm_nt(1.0, XL, A, 0.0, H)
    if scaling != 0 and rank > 0:
        # The thin term first, so that the big product accumulates onto it
        # (beta = 1) in the one pass that writes Y.
        gemm_nt(scaling, H, B, 0.0, Y)
        gemm_nt(1.0, X, W, 1.0, Y)
    else:
        gemm_nt(1.0, X, W, 0.0, Y)
    return Y


_forward_train_checked = guarded(
    "forward_train",
    (("W", "f2"), ("A", "f2"), ("B", "f2"), ("scaling", "real"), ("X", "f2"), ("XL", "f2"),
     ("Y", "f2w"), ("H", "f2w")),
    _forward_train)


@njit(**JIT_OPTIONS)
def forward_train(W, A, B, scaling, X, XL, Y, H):
    """Training forward: ``Y = X @ W.T + scaling * H @ B.T`` with ``H = XL @ A.T`` kept.

    Parameters
    ----------
    W : ndarray, shape (out_features, in_features)
        Frozen base weight.
    A : ndarray, shape (rank, in_features)
        The LoRA down-projection.
    B : ndarray, shape (out_features, rank)
        The LoRA up-projection.
    scaling : float
        Multiplier of the low-rank term; ``0`` gives ``Y = X @ W.T`` (H is
        still filled).
    X : ndarray, shape (batch, in_features)
        Input rows; ``batch`` may be 0 (nothing is written).
    XL : ndarray, shape (batch, in_features)
        The LoRA branch's input: ``X`` itself (the same array, no copy)
        without dropout, else :func:`apply_dropout`'s output.
    Y : ndarray, shape (batch, out_features)
        Output, overwritten.
    H : ndarray, shape (batch, rank)
        Overwritten with ``XL @ A.T``, which :func:`backward` needs.

    Returns
    -------
    Y : ndarray
        The same array as ``Y``.

    Notes
    -----
    All arrays C-contiguous and of one float dtype; ``Y`` and ``H`` must not
    overlap the inputs.

    See Also
    --------
    backward : Its gradients.
    apply_dropout : Makes ``XL`` with LoRA dropout.
    numba_lora.LoraLinear.forward_train : The layer's training forward.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> rng = np.random.default_rng(0)
    >>> W, A = rng.standard_normal((5, 4)), rng.standard_normal((2, 4))
    >>> B = rng.standard_normal((5, 2))
    >>> X, dY = rng.standard_normal((3, 4)), rng.standard_normal((3, 5))
    >>> Y, H = np.empty((3, 5)), np.empty((3, 2))
    >>> _ = kernels.forward_train(W, A, B, 0.5, X, X, Y, H)
    >>> bool(np.allclose(Y, X @ W.T + 0.5 * (X @ A.T) @ B.T)), bool(np.allclose(H, X @ A.T))
    (True, True)
    """
    return _forward_train_checked(W, A, B, scaling, X, XL, Y, H)


@njit(**EXACT_OPTIONS)
def _dropout_rows(X, mask, keep, out, r0, r1):
    zero = out.dtype.type(0)
    for i in range(r0, r1):
        for j in range(X.shape[1]):
            # x * (mask * keep), as torch multiplies by its dropout noise:
            # a dropped element is x * 0 (so -0 for negative x).
            out[i, j] = X[i, j] * (keep if mask[i, j] else zero)


@njit(**EXACT_OPTIONS)
def _apply_dropout(X, mask, keep_scale, out):
    _check_keep(keep_scale)
    batch, in_features = X.shape
    _check_rows("mask must have X's shape (batch, in_features)", mask, batch, in_features)
    _check_rows("out must have X's shape (batch, in_features)", out, batch, in_features)
    keep = out.dtype.type(keep_scale)
    _dropout_rows(X, mask, keep, out, 0, batch)
    return out


_apply_dropout_checked = guarded(
    "apply_dropout", (("X", "f2"), ("mask", "b2"), ("keep_scale", "real"), ("out", "f2w")),
    _apply_dropout, in_place=(("out", "X"),))


@njit(**EXACT_OPTIONS)
def apply_dropout(X, mask, keep_scale, out):
    """PEFT's LoRA dropout on given masks: ``out = X * (mask * keep_scale)``.

    Parameters
    ----------
    X : ndarray, shape (batch, in_features)
        The input rows.
    mask : ndarray of bool, shape (batch, in_features)
        True keeps the element.  Draw it in Python from a seedable
        generator, e.g. ``rng.random(X.shape) >= p``.
    keep_scale : float
        ``1 / (1 - p)``; finite and ``>= 1`` (else
        :class:`~numba_lora.LoraConfigError`).  It is rounded once to X's
        dtype, and each element is ``X * keep`` or ``X * 0``, as torch's
        ``nn.Dropout`` multiplies by its noise.
    out : ndarray, shape (batch, in_features)
        Overwritten; may be ``X`` itself (in place).

    Returns
    -------
    out : ndarray
        The same array as ``out``.

    See Also
    --------
    forward_train : Takes the result as ``XL``.
    backward_dropout : The backward with the same mask.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> X = np.arange(1.0, 7.0).reshape(2, 3)
    >>> mask = np.array([[True, False, True], [False, True, True]])
    >>> kernels.apply_dropout(X, mask, 2.0, np.empty_like(X))
    array([[ 2.,  0.,  6.],
           [ 0., 10., 12.]])
    """
    return _apply_dropout_checked(X, mask, keep_scale, out)


# --------------------------------------------------------------- backward
@njit(**JIT_OPTIONS)
def _transpose_into(src, dst):
    for i in range(src.shape[0]):
        for j in range(src.shape[1]):
            dst[j, i] = src[i, j]


@njit(**JIT_OPTIONS)
def _scale_into(beta, array):
    """array = beta * array, with beta == 0 writing zeros (as BLAS does) over anything."""
    for i in range(array.shape[0]):
        for j in range(array.shape[1]):
            array[i, j] = beta * array[i, j] if beta != 0 else 0


@njit(**JIT_OPTIONS)
def _factor_grads(B, scaling, XL, H, dY, dA, dB, beta, G):
    """dA = s G^T XL + beta dA and dB = s dY^T H + beta dB, G = dY B (filled here).

    BLAS has no "transposed first operand" entry here (only a @ b and
    a @ b.T), so the two thin (batch, rank) factors are transposed into
    (rank, batch) copies, and dB is computed transposed and added in: all
    of these are batch * rank or out_features * rank elements, against the
    batch * in_features * rank products.
    """
    batch = dY.shape[0]
    out_features, rank = B.shape
    gemm_nn(1.0, dY, B, 0.0, G)
    GT = np.empty((rank, batch), dtype=G.dtype)
    _transpose_into(G, GT)
    gemm_nn(scaling, GT, XL, beta, dA)
    HT = np.empty((rank, batch), dtype=G.dtype)
    _transpose_into(H, HT)
    dBT = np.empty((rank, out_features), dtype=G.dtype)
    gemm_nn(scaling, HT, dY, 0.0, dBT)
    if beta == 0:
        for o in range(out_features):
            for r in range(rank):
                dB[o, r] = dBT[r, o]
    else:
        for o in range(out_features):
            for r in range(rank):
                dB[o, r] = beta * dB[o, r] + dBT[r, o]


@njit(**JIT_OPTIONS)
def _mask_rows(dX, mask, keep):
    zero = dX.dtype.type(0)
    for i in range(dX.shape[0]):
        for j in range(dX.shape[1]):
            dX[i, j] = dX[i, j] * (keep if mask[i, j] else zero)


@njit(**JIT_OPTIONS)
def _backward_all(W, A, B, scaling, XL, H, dY, dX, dA, dB, beta, mask, keep, dropout):
    _check_factors(W, A, B)
    out_features, in_features = W.shape
    rank = A.shape[0]
    batch = _check_backward(out_features, in_features, rank, XL, H, dY, dA, dB)
    _check_rows("dX must be (batch, in_features), batch = dY.shape[0]", dX, batch, in_features)
    if dropout:
        _check_rows("mask must be (batch, in_features), batch = dY.shape[0]", mask, batch,
                    in_features)
    if batch == 0 or scaling == 0 or rank == 0:
        _scale_into(beta, dA)
        _scale_into(beta, dB)
        if batch > 0:
            gemm_nn(1.0, dY, W, 0.0, dX)
        return
    G = np.empty((batch, rank), dtype=dX.dtype)
    _factor_grads(B, scaling, XL, H, dY, dA, dB, beta, G)
    # The thin LoRA part of dX first (masked where dropout dropped), then
    # the big product accumulates onto it (beta = 1) in one pass over dX.
    gemm_nn(scaling, G, A, 0.0, dX)
    if dropout:
        _mask_rows(dX, mask, dX.dtype.type(keep))
    gemm_nn(1.0, dY, W, 1.0, dX)


@njit(**JIT_OPTIONS)
def _backward(W, A, B, scaling, XL, H, dY, dX, dA, dB, beta):
    # A (0, 0) mask of the right dtype: never read without dropout.
    mask = np.zeros((0, 0), dtype=np.bool_)
    _backward_all(W, A, B, scaling, XL, H, dY, dX, dA, dB, beta, mask, 1.0, False)


@njit(**JIT_OPTIONS)
def _backward_dropout(W, A, B, scaling, XL, H, dY, mask, keep_scale, dX, dA, dB, beta):
    _check_keep(keep_scale)
    _backward_all(W, A, B, scaling, XL, H, dY, dX, dA, dB, beta, mask, keep_scale, True)


@njit(**JIT_OPTIONS)
def _backward_factors(B, scaling, XL, H, dY, dA, dB, beta):
    out_features, rank = B.shape
    in_features = XL.shape[1]
    if not B.flags.c_contiguous:
        raise LoraShapeError("B must be C-contiguous")
    batch = _check_backward(out_features, in_features, rank, XL, H, dY, dA, dB)
    if batch == 0 or scaling == 0 or rank == 0:
        _scale_into(beta, dA)
        _scale_into(beta, dB)
        return
    G = np.empty((batch, rank), dtype=dA.dtype)
    _factor_grads(B, scaling, XL, H, dY, dA, dB, beta, G)


_BACK_IN = (("W", "f2"), ("A", "f2"), ("B", "f2"), ("scaling", "real"), ("XL", "f2"),
            ("H", "f2"), ("dY", "f2"))
_BACK_OUT = (("dX", "f2w"), ("dA", "f2w"), ("dB", "f2w"), ("beta", "real"))

_backward_checked = guarded("backward", _BACK_IN + _BACK_OUT, _backward)
_backward_dropout_checked = guarded(
    "backward_dropout", _BACK_IN + (("mask", "b2"), ("keep_scale", "real")) + _BACK_OUT,
    _backward_dropout)
_backward_factors_checked = guarded(
    "backward_factors",
    (("B", "f2"), ("scaling", "real"), ("XL", "f2"), ("H", "f2"), ("dY", "f2"), ("dA", "f2w"),
     ("dB", "f2w"), ("beta", "real")),
    _backward_factors)


@njit(**JIT_OPTIONS)
def backward(W, A, B, scaling, XL, H, dY, dX, dA, dB, beta):
    """Backward of :func:`forward_train` without dropout: dX, dA and dB from dY.

    Computes, for ``Y = X W^T + s (XL A^T) B^T`` with ``W`` frozen::

        dA = s * (dY @ B).T @ XL  + beta * dA
        dB = s * dY.T @ H         + beta * dB
        dX = dY @ W + s * (dY @ B) @ A          (overwritten)

    Parameters
    ----------
    W : ndarray, shape (out_features, in_features)
        Frozen base weight.
    A : ndarray, shape (rank, in_features)
        The LoRA down-projection.
    B : ndarray, shape (out_features, rank)
        The LoRA up-projection.
    scaling : float
        ``s``; with ``0`` the factor gradients get no contribution
        (``dA = beta * dA``, ``dB = beta * dB``) and ``dX = dY @ W``.
    XL : ndarray, shape (batch, in_features)
        The LoRA branch's input of the forward (``X`` without dropout).
    H : ndarray, shape (batch, rank)
        ``XL @ A.T``, as :func:`forward_train` left it.
    dY : ndarray, shape (batch, out_features)
        Gradient of the loss with respect to ``Y``; ``batch`` may be 0.
    dX : ndarray, shape (batch, in_features)
        Overwritten with the gradient with respect to ``X``.
    dA : ndarray, shape (rank, in_features)
        Gradient with respect to ``A``, overwritten or accumulated (``beta``).
    dB : ndarray, shape (out_features, rank)
        Gradient with respect to ``B``, overwritten or accumulated (``beta``).
    beta : float
        ``0`` overwrites ``dA`` and ``dB`` (whatever they held, NaN included,
        as BLAS does), ``1`` accumulates into them (micro-batches).

    Notes
    -----
    Cost: the one dense product ``dY @ W`` plus products of width ``rank``.
    To skip ``dX`` (the first adapted layer of a network), use
    :func:`backward_factors`.  Outputs must not overlap inputs (refused: LoraShapeError).

    See Also
    --------
    forward_train : The forward it differentiates.
    backward_dropout : With LoRA dropout.
    backward_factors : dA and dB only.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> rng = np.random.default_rng(0)
    >>> W, A = rng.standard_normal((5, 4)), rng.standard_normal((2, 4))
    >>> B = rng.standard_normal((5, 2))
    >>> X, dY = rng.standard_normal((3, 4)), rng.standard_normal((3, 5))
    >>> H = X @ A.T
    >>> dX, dA, dB = np.empty((3, 4)), np.empty((2, 4)), np.empty((5, 2))
    >>> kernels.backward(W, A, B, 0.5, X, H, dY, dX, dA, dB, 0.0)
    >>> bool(np.allclose(dA, 0.5 * (dY @ B).T @ X)), bool(np.allclose(dB, 0.5 * dY.T @ H))
    (True, True)
    >>> bool(np.allclose(dX, dY @ W + 0.5 * (dY @ B) @ A))
    True
    """
    _backward_checked(W, A, B, scaling, XL, H, dY, dX, dA, dB, beta)


@njit(**JIT_OPTIONS)
def backward_dropout(W, A, B, scaling, XL, H, dY, mask, keep_scale, dX, dA, dB, beta):
    """:func:`backward` with LoRA dropout: the LoRA part of dX is masked too.

    ``dX = dY @ W + (s * (dY @ B) @ A) * (mask * keep_scale)``; dA and dB
    as in :func:`backward` (``XL`` is the dropped-out input
    :func:`apply_dropout` made with the same ``mask`` and ``keep_scale``).

    Parameters
    ----------
    W : ndarray, shape (out_features, in_features)
        Frozen base weight.
    A : ndarray, shape (rank, in_features)
        The LoRA down-projection.
    B : ndarray, shape (out_features, rank)
        The LoRA up-projection.
    scaling : float
        ``s``; with ``0`` the factor gradients get no contribution
        (``dA = beta * dA``, ``dB = beta * dB``) and ``dX = dY @ W``.
    XL : ndarray, shape (batch, in_features)
        The LoRA branch's input of the forward (after dropout).
    H : ndarray, shape (batch, rank)
        ``XL @ A.T``, as :func:`forward_train` left it.
    dY : ndarray, shape (batch, out_features)
        Gradient of the loss with respect to ``Y``; ``batch`` may be 0.
    mask : ndarray of bool, shape (batch, in_features)
        The forward's dropout mask (True keeps).
    keep_scale : float
        ``1 / (1 - p)``, finite and ``>= 1``, rounded once to the dtype.
    dX : ndarray, shape (batch, in_features)
        Overwritten with the gradient with respect to ``X``.
    dA : ndarray, shape (rank, in_features)
        Gradient with respect to ``A``, overwritten or accumulated (``beta``).
    dB : ndarray, shape (out_features, rank)
        Gradient with respect to ``B``, overwritten or accumulated (``beta``).
    beta : float
        ``0`` overwrites ``dA`` and ``dB`` (whatever they held, NaN included,
        as BLAS does), ``1`` accumulates into them (micro-batches).

    See Also
    --------
    backward : Without dropout.
    apply_dropout : Makes ``XL`` from the same mask.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> rng = np.random.default_rng(0)
    >>> W, A = rng.standard_normal((5, 4)), rng.standard_normal((2, 4))
    >>> B = rng.standard_normal((5, 2))
    >>> X, dY = rng.standard_normal((3, 4)), rng.standard_normal((3, 5))
    >>> mask = rng.random((3, 4)) >= 0.5
    >>> XL = kernels.apply_dropout(X, mask, 2.0, np.empty_like(X))
    >>> H = XL @ A.T
    >>> dX, dA, dB = np.empty((3, 4)), np.empty((2, 4)), np.empty((5, 2))
    >>> kernels.backward_dropout(W, A, B, 0.5, XL, H, dY, mask, 2.0, dX, dA, dB, 0.0)
    >>> bool(np.allclose(dX, dY @ W + (0.5 * (dY @ B) @ A) * (mask * 2.0)))
    True
    >>> bool(np.allclose(dA, 0.5 * (dY @ B).T @ XL))
    True
    """
    _backward_dropout_checked(W, A, B, scaling, XL, H, dY, mask, keep_scale, dX, dA, dB, beta)


@njit(**JIT_OPTIONS)
def backward_factors(B, scaling, XL, H, dY, dA, dB, beta):
    """The factor gradients of :func:`backward` only, without dX (no dense product).

    For the first adapted layer of a network, whose input needs no
    gradient: costs only products of width ``rank``.  Dropout changes
    nothing here beyond ``XL`` (pass the dropped-out input).

    Parameters
    ----------
    B : ndarray, shape (out_features, rank)
        The LoRA up-projection (it also gives out_features and rank).
    scaling : float
        ``s``; with ``0`` the gradients get no contribution.
    XL : ndarray, shape (batch, in_features)
        The LoRA branch's input of the forward (after dropout, if any).
    H : ndarray, shape (batch, rank)
        ``XL @ A.T``, as :func:`forward_train` left it.
    dY : ndarray, shape (batch, out_features)
        Gradient of the loss with respect to ``Y``; ``batch`` may be 0.
    dA : ndarray, shape (rank, in_features)
        Gradient with respect to ``A``, overwritten or accumulated (``beta``).
    dB : ndarray, shape (out_features, rank)
        Gradient with respect to ``B``, overwritten or accumulated (``beta``).
    beta : float
        ``0`` overwrites ``dA`` and ``dB`` (whatever they held, NaN included,
        as BLAS does), ``1`` accumulates into them (micro-batches).

    See Also
    --------
    backward : Also dX.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> rng = np.random.default_rng(0)
    >>> W, A = rng.standard_normal((5, 4)), rng.standard_normal((2, 4))
    >>> B = rng.standard_normal((5, 2))
    >>> X, dY = rng.standard_normal((3, 4)), rng.standard_normal((3, 5))
    >>> H = X @ A.T
    >>> dA, dB = np.zeros((2, 4)), np.zeros((5, 2))
    >>> kernels.backward_factors(B, 0.5, X, H, dY, dA, dB, 1.0)    # accumulate into zeros
    >>> bool(np.allclose(dA, 0.5 * (dY @ B).T @ X)), bool(np.allclose(dB, 0.5 * dY.T @ H))
    (True, True)
    """
    _backward_factors_checked(B, scaling, XL, H, dY, dA, dB, beta)


# ----------------------------------------------------------------- AdamW
@njit(**EXACT_OPTIONS)
def _check_like(param, a):
    if a.shape[0] != param.shape[0] or a.shape[1] != param.shape[1]:
        raise LoraShapeError("grad and optimizer state must have param's shape")
    if not (a.flags.c_contiguous and param.flags.c_contiguous):
        raise LoraShapeError("param, grad and optimizer state must be C-contiguous")


@njit(**EXACT_OPTIONS)
def _finite(x):
    return abs(x) < np.inf  # False for NaN too (no fastmath here)


@njit(**EXACT_OPTIONS)
def _adamw_scalars(step, lr, beta1, beta2, eps, weight_decay):
    """The per-step constants, in float64 as torch computes them in Python floats."""
    if not (step >= 1):
        raise LoraConfigError("adamw_step: step must be >= 1 (the count after this update)")
    if not (_finite(lr) and lr >= 0):
        raise LoraConfigError("adamw_step: lr must be finite and >= 0")
    if not (beta1 >= 0 and beta1 < 1 and beta2 >= 0 and beta2 < 1):
        raise LoraConfigError("adamw_step: beta1 and beta2 must be in [0, 1)")
    if not (_finite(eps) and eps >= 0):
        raise LoraConfigError("adamw_step: eps must be finite and >= 0")
    if not (_finite(weight_decay) and weight_decay >= 0):
        raise LoraConfigError("adamw_step: weight_decay must be finite and >= 0")
    t = np.float64(step)  # float ** float: libm's pow, as Python's float ** float
    b1 = np.float64(beta1)
    b2 = np.float64(beta2)
    bias_correction1 = 1.0 - b1 ** t
    bias_correction2 = 1.0 - b2 ** t
    step_size = np.float64(lr) / bias_correction1
    bias_correction2_sqrt = bias_correction2 ** 0.5
    decay = 1.0 - np.float64(lr) * np.float64(weight_decay)
    return decay, 1.0 - b1, b2, 1.0 - b2, -step_size, bias_correction2_sqrt, np.float64(eps)


@njit(**EXACT_OPTIONS)
def _adamw_range(p, g, m, v, lo, hi, decay, w, b2, c2, neg_step, bc2_sqrt, eps):
    """Elements lo..hi-1 of the flat arrays, in torch's single-tensor order, in one pass.

    ``decay`` is 1 when torch skips the weight decay (a product by 1 is
    exact, so the bits are the same).  Written so that LLVM vectorises the
    loops: unsigned indices (Numba then emits no negative-index wraparound)
    and ``np.divide`` (IEEE division; ``/`` would test every divisor for
    zero to raise Python's ZeroDivisionError).
    """
    # torch's lerp: the weight's size picks the formula (both fused); the
    # choice is made once, outside the loop that vectorises.
    if abs(w) < 0.5:
        for k in range(np.uint64(lo), np.uint64(hi)):
            gk = g[k]
            mk = fma(w, gk - m[k], m[k])
            # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            vk = fma(c2 * gk, gk, v[k] * b2)
            m[k] = mk
            v[k] = vk
            # denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + eps;
            # param.addcdiv_(exp_avg, denom, value=-step_size)
            p[k] = p[k] * decay + np.divide(neg_step * mk, np.divide(np.sqrt(vk), bc2_sqrt) + eps)
    else:
        wm1 = w - p.dtype.type(1)
        for k in range(np.uint64(lo), np.uint64(hi)):
            gk = g[k]
            mk = fma(wm1, gk - m[k], gk)
            vk = fma(c2 * gk, gk, v[k] * b2)
            m[k] = mk
            v[k] = vk
            p[k] = p[k] * decay + np.divide(neg_step * mk, np.divide(np.sqrt(vk), bc2_sqrt) + eps)


@njit(**EXACT_OPTIONS)
def _flat(array):
    """A 1-D view of a C-contiguous array (checked before), whatever its Numba layout."""
    return np.ascontiguousarray(array).reshape(array.size)


@njit(**EXACT_OPTIONS)
def _adamw_prepare(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    _check_like(param, grad)
    _check_like(param, exp_avg)
    _check_like(param, exp_avg_sq)
    decay, w, b2, c2, neg_step, bc2_sqrt, eps_ = _adamw_scalars(
        step, lr, beta1, beta2, eps, weight_decay)
    t = param.dtype.type
    if weight_decay == 0:
        decay = 1.0
    return t(decay), t(w), t(b2), t(c2), t(neg_step), t(bc2_sqrt), t(eps_)


@njit(parallel=True, **EXACT_OPTIONS)
def _adamw_parallel(p, g, m, v, decay, w, b2, c2, neg_step, bc2_sqrt, eps):
    n = p.shape[0]
    for c in prange((n + CHUNK - 1) // CHUNK):
        _adamw_range(p, g, m, v, c * CHUNK, min(n, (c + 1) * CHUNK), decay, w, b2, c2,
                     neg_step, bc2_sqrt, eps)


@njit(**EXACT_OPTIONS)
def _adamw(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    decay, w, b2, c2, neg_step, bc2_sqrt, eps_ = _adamw_prepare(
        param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay)
    _adamw_parallel(_flat(param), _flat(grad), _flat(exp_avg), _flat(exp_avg_sq), decay, w, b2,
                    c2, neg_step, bc2_sqrt, eps_)


@njit(**EXACT_OPTIONS)
def _adamw_serial(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    decay, w, b2, c2, neg_step, bc2_sqrt, eps_ = _adamw_prepare(
        param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay)
    _adamw_range(_flat(param), _flat(grad), _flat(exp_avg), _flat(exp_avg_sq), 0, param.size,
                 decay, w, b2, c2, neg_step, bc2_sqrt, eps_)


_ADAMW = (("param", "f2w"), ("grad", "f2"), ("exp_avg", "f2w"), ("exp_avg_sq", "f2w"),
          ("step", "int"), ("lr", "real"), ("beta1", "real"), ("beta2", "real"), ("eps", "real"),
          ("weight_decay", "real"))
_adamw_checked = guarded("adamw_step", _ADAMW, _adamw)
_adamw_serial_checked = guarded("adamw_step_serial", _ADAMW, _adamw_serial)


@njit(**EXACT_OPTIONS)
def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    """One AdamW update in place, in torch.optim.AdamW's order, on Numba's threads.

    Per element, in the arrays' dtype, each operation rounded once, with
    the constants computed in float64 (Python floats in torch) and rounded
    once to the dtype::

        param   = param * (1 - lr * weight_decay)          (skipped if weight_decay == 0)
        exp_avg = lerp(exp_avg, grad, 1 - beta1)            (torch's fused lerp:
                  fma(w, g - m, m) if |w| < 0.5 else fma(w - 1, g - m, g))
        exp_avg_sq = fma((1 - beta2) * g, g, exp_avg_sq * beta2)
        denom   = sqrt(exp_avg_sq) / sqrt(1 - beta2**step) + eps
        param   = param + (-lr / (1 - beta1**step)) * exp_avg / denom

    This is ``torch.optim.AdamW(foreach=False)`` (torch's default for CPU
    tensors), operation for operation, as torch 2.13's vectorised CPU loops
    round it: the moments ``exp_avg`` and ``exp_avg_sq`` come out bit for
    bit equal to torch's (float32 and float64).  ``param`` can differ from
    torch's in the last bit, for two reasons that are torch's, not
    arithmetic this kernel could reproduce on every machine: torch's SIMD
    ``sqrt`` is not always correctly rounded (on an AVX-512 CPU, about 17% of
    float32 and 1% of float64 elements are 1 ulp off), where this kernel's
    is; and torch's scalar loop (tensors shorter than its SIMD width, and
    the last elements of longer ones) rounds the last line as
    ``param + c * (exp_avg / denom)`` in float32.

    Parameters
    ----------
    param : ndarray, 2-D
        Updated in place.
    grad : ndarray, param's shape
        The gradient of the loss with respect to ``param``.
    exp_avg, exp_avg_sq : ndarray, param's shape
        Moments, updated in place (zeros before the first step).
    step : int
        The step count including this update (1 for the first call).
    lr, beta1, beta2, eps, weight_decay : float
        ``lr >= 0``, betas in ``[0, 1)``, ``eps >= 0``, ``weight_decay >= 0``,
        all finite; else :class:`~numba_lora.LoraConfigError` with nothing
        written.

    Notes
    -----
    All arrays of one dtype, C-contiguous, none overlapping another.  The
    result is the same bits for any thread count (elements are
    independent).

    See Also
    --------
    adamw_step_serial : The same on the calling thread.
    numba_lora.AdamW : The optimizer that calls it for every factor.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> param, grad = np.ones((2, 3)), np.full((2, 3), 0.5)
    >>> m, v = np.zeros((2, 3)), np.zeros((2, 3))
    >>> kernels.adamw_step(param, grad, m, v, 1, 0.1, 0.9, 0.999, 1e-8, 0.0)
    >>> bool(np.allclose(param, 0.9))           # the first step moves each element by lr
    True
    >>> bool(np.allclose(m, 0.05)), bool(np.allclose(v, 0.00025))
    (True, True)
    """
    _adamw_checked(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay)


@njit(**EXACT_OPTIONS)
def adamw_step_serial(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps,
                      weight_decay):
    """:func:`adamw_step` on the calling thread (for a caller's own ``prange``); same bits.

    Parameters
    ----------
    param : ndarray, 2-D
        Updated in place.
    grad : ndarray, param's shape
        The gradient of the loss with respect to ``param``.
    exp_avg, exp_avg_sq : ndarray, param's shape
        Moments, updated in place (zeros before the first step).
    step : int
        The step count including this update (1 for the first call).
    lr, beta1, beta2, eps, weight_decay : float
        ``lr >= 0``, betas in ``[0, 1)``, ``eps >= 0``, ``weight_decay >= 0``,
        all finite; else :class:`~numba_lora.LoraConfigError` with nothing
        written.

    See Also
    --------
    adamw_step : The same on Numba's threads.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> p1, p2, grad = np.ones((2, 3)), np.ones((2, 3)), np.full((2, 3), 0.5)
    >>> m1, v1, m2, v2 = (np.zeros((2, 3)) for _ in range(4))
    >>> kernels.adamw_step_serial(p1, grad, m1, v1, 1, 0.1, 0.9, 0.999, 1e-8, 0.01)
    >>> kernels.adamw_step(p2, grad, m2, v2, 1, 0.1, 0.9, 0.999, 1e-8, 0.01)
    >>> bool((p1 == p2).all())
    True
    """
    _adamw_serial_checked(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps,
                          weight_decay)


# ------------------------------------------------------------------- SGD
@njit(**EXACT_OPTIONS)
def _sgd_range(p, g, buf, lo, hi, neg_lr, momentum, c, wd, nesterov, first, use_momentum):
    for k in range(np.uint64(lo), np.uint64(hi)):
        d = g[k]
        if wd != 0:
            d = fma(p[k], wd, d)              # grad.add(param, alpha=weight_decay)
        if use_momentum:
            if first:
                b = d                          # buf = clone(grad)
            else:
                # buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                b = fma(d, c, buf[k] * momentum)
            buf[k] = b
            d = fma(b, momentum, d) if nesterov else b
        p[k] = fma(d, neg_lr, p[k])           # param.add_(grad, alpha=-lr)


@njit(**EXACT_OPTIONS)
def _sgd_prepare(param, grad, momentum_buffer, lr, momentum, dampening, weight_decay, nesterov,
                 first):
    _check_like(param, grad)
    _check_like(param, momentum_buffer)
    if not (_finite(lr) and lr >= 0):
        raise LoraConfigError("sgd_step: lr must be finite and >= 0")
    if not (_finite(momentum) and momentum >= 0):
        raise LoraConfigError("sgd_step: momentum must be finite and >= 0")
    if not (_finite(dampening) and _finite(weight_decay) and weight_decay >= 0):
        raise LoraConfigError("sgd_step: dampening and weight_decay must be finite, "
                              "weight_decay >= 0")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise LoraConfigError("sgd_step: nesterov needs momentum > 0 and dampening 0")
    t = param.dtype.type
    return (t(-np.float64(lr)), t(momentum), t(1.0 - np.float64(dampening)), t(weight_decay),
            nesterov != 0, first != 0, momentum != 0)


@njit(parallel=True, **EXACT_OPTIONS)
def _sgd_parallel(p, g, buf, neg_lr, momentum, c, wd, nesterov, first, use_momentum):
    n = p.shape[0]
    for k in prange((n + CHUNK - 1) // CHUNK):
        _sgd_range(p, g, buf, k * CHUNK, min(n, (k + 1) * CHUNK), neg_lr, momentum, c, wd,
                   nesterov, first, use_momentum)


@njit(**EXACT_OPTIONS)
def _sgd(param, grad, momentum_buffer, lr, momentum, dampening, weight_decay, nesterov, first):
    neg_lr, mom, c, wd, nest, fst, use = _sgd_prepare(
        param, grad, momentum_buffer, lr, momentum, dampening, weight_decay, nesterov, first)
    _sgd_parallel(_flat(param), _flat(grad), _flat(momentum_buffer), neg_lr, mom, c, wd, nest,
                  fst, use)


@njit(**EXACT_OPTIONS)
def _sgd_serial(param, grad, momentum_buffer, lr, momentum, dampening, weight_decay, nesterov,
                first):
    neg_lr, mom, c, wd, nest, fst, use = _sgd_prepare(
        param, grad, momentum_buffer, lr, momentum, dampening, weight_decay, nesterov, first)
    _sgd_range(_flat(param), _flat(grad), _flat(momentum_buffer), 0, param.size, neg_lr, mom, c,
               wd, nest, fst, use)


_SGD = (("param", "f2w"), ("grad", "f2"), ("momentum_buffer", "f2w"), ("lr", "real"),
        ("momentum", "real"), ("dampening", "real"), ("weight_decay", "real"),
        ("nesterov", "int"), ("first", "int"))
_sgd_checked = guarded("sgd_step", _SGD, _sgd)
_sgd_serial_checked = guarded("sgd_step_serial", _SGD, _sgd_serial)


@njit(**EXACT_OPTIONS)
def sgd_step(param, grad, momentum_buffer, lr, momentum, dampening, weight_decay, nesterov,
             first):
    """One SGD update in place, in torch.optim.SGD's single-tensor order (fused adds).

    Per element::

        d = fma(param, weight_decay, grad)                  (if weight_decay != 0)
        if momentum != 0:
            buf = d if first else fma(d, 1 - dampening, buf * momentum)
            d = fma(buf, momentum, d) if nesterov else buf
        param = fma(d, -lr, param)

    Parameters
    ----------
    param : ndarray, 2-D
        Updated in place.
    grad : ndarray, param's shape
        The gradient of the loss with respect to ``param``.
    momentum_buffer : ndarray, param's shape
        Updated in place when ``momentum != 0`` (not read when ``first``).
    lr, momentum, dampening, weight_decay : float
        Finite; ``lr``, ``momentum``, ``weight_decay >= 0``.
    nesterov : int
        1 for Nesterov momentum (needs ``momentum > 0``, ``dampening == 0``).
    first : int
        1 on the first step: the buffer starts as the gradient.

    See Also
    --------
    sgd_step_serial : The same on the calling thread.
    numba_lora.SGD : The optimizer that calls it for every factor.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> param, grad, buf = np.ones((2, 2)), np.full((2, 2), 0.5), np.empty((2, 2))
    >>> kernels.sgd_step(param, grad, buf, 0.1, 0.9, 0.0, 0.0, 0, 1)
    >>> param
    array([[0.95, 0.95],
           [0.95, 0.95]])
    >>> kernels.sgd_step(param, grad, buf, 0.1, 0.9, 0.0, 0.0, 0, 0)   # buf = 0.9 * 0.5 + 0.5
    >>> param
    array([[0.855, 0.855],
           [0.855, 0.855]])
    """
    _sgd_checked(param, grad, momentum_buffer, lr, momentum, dampening, weight_decay, nesterov,
                 first)


@njit(**EXACT_OPTIONS)
def sgd_step_serial(param, grad, momentum_buffer, lr, momentum, dampening, weight_decay,
                    nesterov, first):
    """:func:`sgd_step` on the calling thread; same bits.

    Parameters
    ----------
    param : ndarray, 2-D
        Updated in place.
    grad : ndarray, param's shape
        The gradient of the loss with respect to ``param``.
    momentum_buffer : ndarray, param's shape
        Updated in place when ``momentum != 0`` (not read when ``first``).
    lr, momentum, dampening, weight_decay : float
        Finite; ``lr``, ``momentum``, ``weight_decay >= 0``.
    nesterov : int
        1 for Nesterov momentum (needs ``momentum > 0``, ``dampening == 0``).
    first : int
        1 on the first step: the buffer starts as the gradient.

    See Also
    --------
    sgd_step : The same on Numba's threads.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> param, grad, buf = np.ones((2, 2)), np.full((2, 2), 0.5), np.empty((2, 2))
    >>> kernels.sgd_step_serial(param, grad, buf, 0.1, 0.0, 0.0, 0.0, 0, 1)
    >>> param
    array([[0.95, 0.95],
           [0.95, 0.95]])
    """
    _sgd_serial_checked(param, grad, momentum_buffer, lr, momentum, dampening, weight_decay,
                        nesterov, first)
