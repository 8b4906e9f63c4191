"""numba_lora: LoRA (low-rank adaptation of linear layers) on CPUs with Numba.

The public surface:

- :class:`LoraLinear`, a frozen linear layer with a low-rank update that can
  be merged into its weight and unmerged again;
- :class:`LoraAdapter` and :class:`LoraConfig`, the layers of a whole
  adapter, read from and written to PEFT's file format;
- :class:`QLoraLinear`, the same over a 4-bit NF4 base weight (QLoRA,
  bit-compatible with bitsandbytes; the format in :mod:`numba_lora.nf4`);
- training: :meth:`LoraLinear.forward_train` / :meth:`LoraLinear.backward`,
  :class:`AdamW`, :class:`SGD` and :func:`clip_grad_norm`
  (:mod:`numba_lora.optim`, :mod:`numba_lora.training`);
- :mod:`numba_lora.kernels`, the ``@njit`` kernels behind it, callable from
  your own ``@njit`` code;
- the exceptions in :mod:`numba_lora.errors`, rooted at :class:`LoraError`.
"""

import numba as _numba

from .errors import LoraEnvironmentError as _LoraEnvironmentError

if _numba.config.DISABLE_JIT:
    # The kernels call BLAS through symbols only compiled code can reach;
    # run as plain Python they would compute nothing, silently.
    raise _LoraEnvironmentError(
        "numba_lora needs Numba's compiler, but NUMBA_DISABLE_JIT=1 is set. Unset it "
        "(for coverage of numba_lora's Python code, coverage works with the JIT on)."
    )

from ._cache import clear_cache, install_locator  # noqa: E402

install_locator()  # before any kernel is defined

from . import kernels  # noqa: E402
from .adapter import AdapterSummary, LoraAdapter  # noqa: E402
from .config import LoraConfig  # noqa: E402
from .errors import (  # noqa: E402
    LoraConfigError,
    LoraDtypeError,
    LoraError,
    LoraFormatError,
    LoraKeyError,
    LoraNonFiniteError,
    LoraShapeError,
    LoraStateError,
    LoraUnsupportedError,
    LoraTypeError,
    LoraEnvironmentError,
)
from ._threads import get_num_threads, set_num_threads  # noqa: E402
from .layer import LoraLinear  # noqa: E402
from .multi import MultiLoraLinear  # noqa: E402
from . import nf4, optim, training  # noqa: E402
from .optim import SGD, AdamW, clip_grad_norm  # noqa: E402
from .qlora import QLoraLinear  # noqa: E402


def _version():
    # pyproject.toml's [project] version is the only place it is written.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("numba_lora")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


__version__ = _version()

__all__ = [
    "LoraLinear",
    "LoraConfig",
    "LoraAdapter",
    "AdapterSummary",
    "MultiLoraLinear",
    "QLoraLinear",
    "AdamW",
    "SGD",
    "clip_grad_norm",
    "kernels",
    "nf4",
    "optim",
    "training",
    "clear_cache",
    "set_num_threads",
    "get_num_threads",
    "LoraError",
    "LoraConfigError",
    "LoraShapeError",
    "LoraDtypeError",
    "LoraStateError",
    "LoraNonFiniteError",
    "LoraKeyError",
    "LoraFormatError",
    "LoraUnsupportedError",
    "LoraTypeError",
    "LoraEnvironmentError",
    "__version__",
]
