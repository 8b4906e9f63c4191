"""What the layers share: shape, dtype and a read-only view of W; the low-rank factors' attributes."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._validate import as_real_array, check_out, check_shape


class FrozenWeight:
    """Mixin for classes that keep their weight, C-contiguous, in ``self._W``."""

    __slots__ = ()

    @property
    def in_features(self) -> int:
        """int: Length of an input vector (columns of W)."""
        return self._W.shape[1]

    @property
    def out_features(self) -> int:
        """int: Length of an output vector (rows of W)."""
        return self._W.shape[0]

    @property
    def dtype(self) -> np.dtype:
        """numpy.dtype: The layer's dtype (float32 or float64)."""
        return self._W.dtype

    @property
    def weight(self) -> NDArray[np.floating]:
        """ndarray: Read-only view of the current W."""
        return readonly(self._W)


class LowRankFactors:
    """Mixin for layers with factors ``self._A``, ``self._B`` and their settings.

    The class provides ``set_lora_a`` / ``set_lora_b`` (what a new factor is
    converted to and how it is stored differs from layer to layer) and
    ``_held`` (the float arrays a forward reads, for the overlap check).
    B's dtype is the layer's: inputs are converted to it, outputs made in it.
    """

    __slots__ = ()

    @property
    def rank(self) -> int:
        """int: Rank of the low-rank update."""
        return self._rank

    @property
    def alpha(self) -> float:
        """float: LoRA alpha."""
        return self._alpha

    @property
    def use_rslora(self) -> bool:
        """bool: Whether ``scaling = alpha / sqrt(rank)``."""
        return self._use_rslora

    @property
    def scaling(self) -> float:
        """float: ``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA."""
        return self._scaling

    @property
    def lora_a(self) -> NDArray[np.floating]:
        """ndarray: Read-only view of A, shape (rank, in_features)."""
        return readonly(self._A)

    @lora_a.setter
    def lora_a(self, value: ArrayLike) -> None:
        self.set_lora_a(value)

    @property
    def lora_b(self) -> NDArray[np.floating]:
        """ndarray: Read-only view of B, shape (out_features, rank)."""
        return readonly(self._B)

    @lora_b.setter
    def lora_b(self, value: ArrayLike) -> None:
        self.set_lora_b(value)

    @property
    def trainable_params(self) -> int:
        """int: ``rank * (in_features + out_features)``."""
        return self._rank * (self.in_features + self.out_features)

    @property
    def total_params(self) -> int:
        """int: ``in_features * out_features + trainable_params``."""
        return self.in_features * self.out_features + self.trainable_params

    @property
    def compression_ratio(self) -> float:
        """float: ``trainable_params / total_params``."""
        return self.trainable_params / self.total_params

    @property
    def is_enabled(self) -> bool:
        """bool: Whether the update takes part in the output."""
        return self._enabled

    def _as_input(self, x, name):
        """``x`` as a C-contiguous array of the layer's dtype (B's); real input only."""
        return np.asarray(as_real_array(x, name, self._B.dtype), order="C")

    def _forward_input(self, x, name, batch):
        """``(array, usual)`` for a forward's input: 1-D, or 2-D rows when ``batch``.

        ``usual``: ``x`` was already a C-contiguous ndarray of the layer's
        dtype and shape, and is passed on as it came, past the conversion
        helpers (decoding calls a forward right after the previous product
        streamed a weight through the caches, where every Python line is a
        cache miss).  Anything else is converted and checked, with the
        messages naming ``name``.
        """
        in_features = self._A.shape[1]
        if (type(x) is np.ndarray and x.dtype == self._B.dtype and x.ndim == 1 + batch
                and x.shape[-1] == in_features and x.flags.c_contiguous):
            return x, True
        x = self._as_input(x, name)
        if batch:
            check_shape(x, (None, in_features), name, ("batch", "in_features"))
        else:
            check_shape(x, (in_features,), name, ("in_features",))
        return x, False

    def _output(self, shape, out, inputs, usual=False):
        """``out`` checked, or a new array of B's dtype, for a forward of ``inputs``.

        ``usual``: the input is passed to the kernel as it came (a
        C-contiguous array of the layer's dtype).  Then a usual ``out``
        (ndarray of that dtype and shape, C-contiguous, writable) is taken
        without the Python overlap checks: the kernels refuse an ``out``
        overlapping any of their arrays before they write anything.
        Decoding calls this right after the previous product streamed a
        weight through the caches, where every Python line is a cache miss.
        """
        dtype = self._B.dtype
        if out is None:
            return np.empty(shape, dtype=dtype)
        if (usual and type(out) is np.ndarray and out.dtype == dtype and out.shape == shape
                and out.flags.c_contiguous and out.flags.writeable):
            return out
        return check_out(out, shape, dtype, (*inputs, *self._held()))


def readonly(array):
    """A view of ``array`` that cannot be written through, nor made writable again.

    NumPy lets a view be flagged writable again whenever the memory's owner
    is writable; a view of a read-only memoryview cannot be.
    """
    return np.asarray(memoryview(array).toreadonly())
