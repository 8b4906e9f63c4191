"""What a training step of a layer keeps between its forward and its backward, and dropout masks.

:meth:`LoraLinear.forward_train <numba_lora.LoraLinear.forward_train>`
returns ``(Y, ctx)``; ``ctx`` (a :class:`TrainContext`) holds the arrays
:meth:`LoraLinear.backward <numba_lora.LoraLinear.backward>` needs, the way
torch's autograd keeps saved tensors.  Masks for LoRA dropout are drawn here,
in Python, from a seedable :class:`numpy.random.Generator`; the kernels only
apply them.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from ._base import readonly
from .errors import LoraConfigError, LoraShapeError

if TYPE_CHECKING:  # layer.py imports this module
    from .layer import LoraLinear

__all__ = ["TrainContext", "dropout_mask", "keep_scale", "check_dropout", "pissa_to_lora"]


def check_dropout(p: float) -> float:
    """Return ``p`` as a float in ``[0, 1)``, else raise :class:`~numba_lora.LoraConfigError`.

    Parameters
    ----------
    p : float
        A dropout probability (a real number, not a bool).

    Returns
    -------
    float
        ``p`` as a Python float.
    """
    if isinstance(p, (bool, np.bool_)) or not isinstance(p, numbers.Real):
        raise LoraConfigError(
            f"dropout must be a real number in [0, 1), got {type(p).__name__} {p!r}")
    value = float(p)
    if not (0.0 <= value < 1.0):  # NaN fails too
        raise LoraConfigError(f"dropout must be in [0, 1), got {value!r}")
    return value


def keep_scale(p: float, dtype: DTypeLike) -> float:
    """``1 / (1 - p)`` as torch's ``nn.Dropout`` scales kept elements, as a float.

    torch divides its 0/1 noise by ``1 - p`` in the tensor's dtype, so a kept
    element is multiplied by ``dtype(1) / dtype(1 - p)`` rounded once.

    Parameters
    ----------
    p : float
        Dropout probability in ``[0, 1)``.
    dtype : numpy dtype or type
        The dtype the scale is computed in (float32 or float64).

    Returns
    -------
    float
        The factor kept elements are multiplied by.
    """
    t = np.dtype(dtype).type
    return float(t(1) / t(1.0 - p))


def dropout_mask(rng: np.random.Generator, shape: tuple[int, ...],
                 p: float) -> NDArray[np.bool_]:
    """A bool mask of ``shape`` that keeps each element with probability ``1 - p``.

    Parameters
    ----------
    rng : numpy.random.Generator
        Draws the uniform noise (``rng.random(shape)``).
    shape : tuple of int
        Shape of the mask.
    p : float
        Dropout probability in ``[0, 1)``.

    Returns
    -------
    ndarray of bool
        C-contiguous; True keeps the element.
    """
    return rng.random(shape) >= p


class TrainContext:
    """What :meth:`~numba_lora.LoraLinear.backward` needs from one training forward.

    Made by :meth:`~numba_lora.LoraLinear.forward_train`; pass it, unchanged,
    to the same layer's ``backward``.  It is valid for one backward per
    forward or more (gradient checks), as long as the layer's factors did
    not change in between (an optimizer step or a setter makes it stale:
    ``backward`` then raises :class:`~numba_lora.LoraStateError`, as torch's
    autograd refuses a tensor modified in place).

    Parameters
    ----------
    layer : LoraLinear
        The layer whose forward made it.
    version : int
        The layer's factor version at the forward (a later change makes it stale).
    X, XL, H : ndarray
        As the attributes below.
    mask : ndarray of bool or None
        As the attribute below.
    dropout : float
        The dropout probability used.
    keep : float
        ``1 / (1 - dropout)`` as :func:`keep_scale` gives it (``keep_scale``).
    lora : bool
        Whether the low-rank branch took part.
    lead : tuple of int, optional
        The input's leading dimensions; defaults to ``(X.shape[0],)``.

    Attributes
    ----------
    lead : tuple of int
        The forward input's leading dimensions (``X.shape[:-1]``); the
        arrays below hold its rows flattened, ``batch = prod(lead)``.
    X : ndarray, shape (batch, in_features)
        The input, in the layer's dtype (a read-only view).  When the
        caller's array already had the layer's dtype and was C-contiguous it
        is that very array, not a copy: do not write into it between the
        forward and the backward (its gradients would be wrong).
    XL : ndarray, shape (batch, in_features)
        The LoRA branch's input: ``X`` itself without dropout, else
        ``X * mask * keep_scale`` (read-only).
    H : ndarray, shape (batch, rank)
        ``XL @ A.T`` (read-only).
    mask : ndarray of bool or None
        The dropout mask (True keeps), or None without dropout.
    dropout : float
        The dropout probability used.
    lora : bool
        Whether the low-rank branch took part (False while disabled: the
        backward then gives ``dX = dY @ W`` and no factor gradients).
    """

    __slots__ = ("layer", "version", "_X", "_XL", "_H", "_mask", "dropout", "keep_scale", "lora",
                 "lead")

    def __init__(self, layer: LoraLinear, version: int, X: np.ndarray, XL: np.ndarray,
                 H: np.ndarray, mask: NDArray[np.bool_] | None, dropout: float, keep: float,
                 lora: bool, lead: tuple[int, ...] | None = None) -> None:
        self.layer = layer
        self.version = version
        self._X = X
        self._XL = XL
        self._H = H
        self._mask = mask
        self.dropout = dropout
        self.keep_scale = keep
        self.lora = lora
        self.lead = (X.shape[0],) if lead is None else tuple(lead)

    @property
    def X(self) -> np.ndarray:
        """ndarray: The input, in the layer's dtype (read-only)."""
        return readonly(self._X)

    @property
    def XL(self) -> np.ndarray:
        """ndarray: The LoRA branch's input, after dropout (read-only)."""
        return readonly(self._XL)

    @property
    def H(self) -> np.ndarray:
        """ndarray: ``XL @ A.T`` (read-only)."""
        return readonly(self._H)

    @property
    def mask(self) -> NDArray[np.bool_] | None:
        """ndarray of bool or None: The dropout mask (True keeps), or None."""
        return None if self._mask is None else readonly(self._mask)

    @property
    def batch(self) -> int:
        """int: Rows of the forward's input (all leading dimensions together)."""
        return self._X.shape[0]

    def __repr__(self):
        return (f"TrainContext(batch={self.batch}, dropout={self.dropout:g}, lora={self.lora})")


def pissa_to_lora(lora_a: ArrayLike, lora_b: ArrayLike, initial_a: ArrayLike, initial_b: ArrayLike,
                  alpha: float, *, use_rslora: bool = False
                  ) -> tuple[NDArray[np.floating], NDArray[np.floating], float]:
    """A PiSSA-trained layer as a plain LoRA update of the *original* base weight.

    A layer made with ``init="pissa"`` trains on the residual base
    ``W_res = W - s B0 A0``; what it learned, relative to the original W, is
    ``s (B A - B0 A0)``, a rank-``2 r`` update.  This is PEFT's conversion
    (``save_pretrained(path_initial_model_for_weight_conversion=...)``):
    ``A' = [A; A0]``, ``B' = [B, -B0]``, rank ``2 r`` and alpha ``2 alpha``
    (``sqrt(2) alpha`` with rsLoRA), which keeps the scaling.  Save the
    result, over the original base weights, and PEFT loads it as an ordinary
    LoRA adapter::

        A0, B0 = layer.lora_a.copy(), layer.lora_b.copy()   # right after init
        ...train...
        A2, B2, alpha2 = pissa_to_lora(layer.lora_a, layer.lora_b, A0, B0, layer.alpha)
        out = LoraAdapter(LoraConfig(r=2 * layer.rank, lora_alpha=alpha2))
        fc = out.add_layer("fc", W_original)
        fc.lora_a, fc.lora_b = A2, B2
        out.save_peft("converted/")

    (``2 r`` must not exceed ``min(out_features, in_features)``.)  Or save
    the PiSSA adapter as it is, together with the residual base weights, and
    load both: PEFT then needs that residual model as its base.

    Parameters
    ----------
    lora_a, lora_b : array_like
        The trained factors, (rank, in_features) and (out_features, rank).
    initial_a, initial_b : array_like
        The factors as the PiSSA initialisation made them.
    alpha : float
        The layer's alpha.
    use_rslora : bool, optional
        Whether the layer scales by ``alpha / sqrt(rank)`` (rsLoRA).

    Returns
    -------
    (A2, B2, alpha2)
        ``A2`` (2 rank, in_features), ``B2`` (out_features, 2 rank), and
        the alpha that keeps the scaling at rank ``2 rank``.
    """
    A, B = np.asarray(lora_a), np.asarray(lora_b)
    A0, B0 = np.asarray(initial_a), np.asarray(initial_b)
    if A.shape != A0.shape or B.shape != B0.shape or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise LoraShapeError(
            f"lora_a {A.shape}, lora_b {B.shape} and the initial factors {A0.shape}, {B0.shape} "
            "must be (rank, in_features) and (out_features, rank), pairwise equal")
    alpha2 = float(alpha) * (math.sqrt(2.0) if use_rslora else 2.0)
    return (np.ascontiguousarray(np.concatenate([A, A0], axis=0)),
            np.ascontiguousarray(np.concatenate([B, -B0], axis=1)), alpha2)


def finite_or_raise(value, what):
    """Return ``value`` as a float if finite, else raise LoraConfigError naming ``what``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise LoraConfigError(f"{what} must be a real number, got {type(value).__name__} {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise LoraConfigError(f"{what} must be finite, got {out!r}")
    return out
