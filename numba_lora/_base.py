"""What every layer over a frozen weight shares: shape, dtype, a read-only view of W."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


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


def readonly(array):
    """A view of ``array`` that cannot be written through, nor made writable again.

    NumPy lets a view be flagged writable again whenever the memory's owner
    is writable; a view of a read-only memoryview cannot be.
    """
    return np.asarray(memoryview(array).toreadonly())
