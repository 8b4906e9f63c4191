"""Exceptions raised by numba_lora.

Every error derives from :class:`LoraError`, so ``except LoraError`` catches
them all; each also derives from the built-in exception a NumPy user would
expect, so ``except ValueError`` keeps working.
"""

__all__ = [
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
]


class LoraError(Exception):
    """Base class of every numba_lora error."""


class LoraConfigError(LoraError, ValueError):
    """A configuration value (rank, alpha, ...) is out of range."""


class LoraShapeError(LoraError, ValueError):
    """An array has the wrong number of dimensions or the wrong size."""


class LoraDtypeError(LoraError, ValueError):
    """An array has a dtype numba_lora cannot use."""


class LoraStateError(LoraError, RuntimeError):
    """The operation does not fit the layer's state (merge twice, ...)."""


class LoraNonFiniteError(LoraError, FloatingPointError):
    """A checked merge would have produced NaN or infinity; W is unchanged."""


class LoraKeyError(LoraError, KeyError):
    """No layer (or base weight) of that name."""

    def __str__(self):  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


class LoraFormatError(LoraError, ValueError):
    """An adapter file is malformed: a missing tensor, a shape that does not fit."""


class LoraUnsupportedError(LoraError, NotImplementedError):
    """An adapter uses a feature numba_lora does not implement (DoRA, embeddings, ...)."""


class LoraTypeError(LoraError, TypeError):
    """An argument has the wrong type (a list where an array is needed, ...)."""


class LoraEnvironmentError(LoraError, RuntimeError):
    """The environment cannot run numba_lora (``NUMBA_DISABLE_JIT=1``, ...)."""
