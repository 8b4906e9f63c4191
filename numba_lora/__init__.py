"""numba_lora: LoRA (low-rank adaptation of linear layers) on CPUs with Numba.

The public surface:

- :class:`LoraLinear`, a frozen linear layer with a low-rank update that can
  be merged into its weight and unmerged again;
- :mod:`numba_lora.kernels`, the ``@njit`` kernels behind it, callable from
  your own ``@njit`` code;
- the exceptions in :mod:`numba_lora.errors`, rooted at :class:`LoraError`.
"""

from ._cache import clear_cache, ensure_fresh_cache

ensure_fresh_cache()  # before any kernel's cached code is loaded

from . import kernels  # noqa: E402
from .errors import (  # noqa: E402
    LoraConfigError,
    LoraDtypeError,
    LoraError,
    LoraNonFiniteError,
    LoraShapeError,
    LoraStateError,
)
from .layer import LoraLinear  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "LoraLinear",
    "kernels",
    "clear_cache",
    "LoraError",
    "LoraConfigError",
    "LoraShapeError",
    "LoraDtypeError",
    "LoraStateError",
    "LoraNonFiniteError",
    "__version__",
]
