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
    """Base class of every numba_lora error.

    ``except LoraError`` catches every error numba_lora raises on purpose;
    each subclass also derives from the built-in exception a NumPy user
    would expect (``ValueError``, ``TypeError``, ``KeyError``, ...), so
    existing ``except`` clauses keep working.  A call that raises one
    leaves every array it was given bit-identical.

    See Also
    --------
    LoraShapeError : The most common one: shapes that do not fit.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import LoraError, LoraLinear
    >>> try:
    ...     LoraLinear(np.zeros((4, 4)), rank=0, alpha=1.0)
    ... except LoraError as exc:
    ...     print(type(exc).__name__, isinstance(exc, ValueError))
    LoraConfigError True
    """


class LoraConfigError(LoraError, ValueError):
    """A configuration value (rank, alpha, ...) is out of range.

    Raised by :class:`~numba_lora.LoraConfig`, the layers' constructors and
    the PEFT reader; the message names the setting (or JSON key) at fault.

    See Also
    --------
    LoraError : The base class of every numba_lora error.
    ValueError : The built-in it also derives from.
    """


class LoraShapeError(LoraError, ValueError):
    """An array has the wrong number of dimensions or the wrong size.

    Also raised by the kernels, before any array is touched, for shapes
    that do not fit together and for arrays that are not C-contiguous.

    See Also
    --------
    LoraError : The base class of every numba_lora error.
    ValueError : The built-in it also derives from.
    """


class LoraDtypeError(LoraError, ValueError):
    """An array has a dtype numba_lora cannot use.

    The layers compute in float32 or float64; the kernels also refuse float
    arrays of different dtypes in one call.

    See Also
    --------
    LoraError : The base class of every numba_lora error.
    ValueError : The built-in it also derives from.
    """


class LoraStateError(LoraError, RuntimeError):
    """The operation does not fit the layer's state (merge twice, ...).

    For example merging a layer that is already merged, or unmerging one
    that is not.

    See Also
    --------
    LoraError : The base class of every numba_lora error.
    RuntimeError : The built-in it also derives from.
    """


class LoraNonFiniteError(LoraError, FloatingPointError):
    """A checked merge would have produced NaN or infinity; W is unchanged.

    Raised by ``merge(check_finite=True)`` and by factor setters on a merged
    layer, which predict the result with
    :func:`~numba_lora.kernels.count_nonfinite_merged` before writing.

    See Also
    --------
    LoraError : The base class of every numba_lora error.
    FloatingPointError : The built-in it also derives from.
    """


class LoraKeyError(LoraError, KeyError):
    """No layer (or base weight) of that name.

    Also raised for adapter ids out of range in the multi-adapter kernels.
    Its message is shown as written (a plain ``KeyError`` quotes it).

    See Also
    --------
    LoraError : The base class of every numba_lora error.
    KeyError : The built-in it also derives from.
    """

    def __str__(self):  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


class LoraFormatError(LoraError, ValueError):
    """An adapter file is malformed: a missing tensor, a shape that does not fit.

    The message names the file and, where there is one, the tensor or JSON
    key at fault.

    See Also
    --------
    LoraError : The base class of every numba_lora error.
    ValueError : The built-in it also derives from.
    """


class LoraUnsupportedError(LoraError, NotImplementedError):
    """An adapter uses a feature numba_lora does not implement (DoRA, embeddings, ...).

    Refused by name rather than silently ignored, since each such feature
    would change the numbers.

    See Also
    --------
    LoraError : The base class of every numba_lora error.
    NotImplementedError : The built-in it also derives from.
    """


class LoraTypeError(LoraError, TypeError):
    """An argument has the wrong type (a list where an array is needed, ...).

    The kernels raise it when a call is compiled, naming the kernel and the
    argument, from Python and from your own ``@njit`` code alike.

    See Also
    --------
    LoraError : The base class of every numba_lora error.
    TypeError : The built-in it also derives from.
    """


class LoraEnvironmentError(LoraError, RuntimeError):
    """The environment cannot run numba_lora (``NUMBA_DISABLE_JIT=1``, ...).

    Also raised when an optional dependency an entry point needs (Dask, for
    :mod:`numba_lora.distributed`) is not installed.

    See Also
    --------
    LoraError : The base class of every numba_lora error.
    RuntimeError : The built-in it also derives from.
    """
