"""Validation and conversion of user input; every check names what it expected and what came."""

import math
import numbers
import operator

import numpy as np

from .errors import LoraConfigError, LoraDtypeError, LoraShapeError, LoraTypeError

#: dtypes a layer computes in.
LAYER_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_rank(rank):
    """Return ``rank`` as an int >= 1, or raise LoraConfigError."""
    if isinstance(rank, (bool, np.bool_)):
        raise LoraConfigError(f"rank must be an integer >= 1, got {rank!r}")
    try:
        value = operator.index(rank)
    except TypeError:
        raise LoraConfigError(
            f"rank must be an integer >= 1, got {type(rank).__name__} {rank!r}"
        ) from None
    if value < 1:
        raise LoraConfigError(f"rank must be an integer >= 1, got {value}")
    return value


def check_name(name, what):
    """Return ``name`` if it is a non-empty string.

    Raises LoraTypeError for a name that is not a str, LoraConfigError for
    the empty string; both name ``what``.
    """
    if not isinstance(name, str):
        raise LoraTypeError(
            f"{what} name must be a non-empty string, got {type(name).__name__} {name!r}"
        )
    if not name:
        raise LoraConfigError(f"{what} name must be a non-empty string, got {name!r}")
    return name


def check_flag(value, what):
    """Return ``value`` as a bool; bools (Python or NumPy) only, else LoraTypeError naming ``what``.

    ``bool("false")`` is True, so a string or other truthy object is refused
    rather than converted.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise LoraTypeError(f"{what} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def check_alpha(alpha):
    """Return ``alpha`` as a finite float > 0, or raise LoraConfigError."""
    if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, numbers.Real):
        raise LoraConfigError(
            f"alpha must be a finite real number > 0, got {type(alpha).__name__} {alpha!r}"
        )
    try:
        value = float(alpha)
    except OverflowError:  # an int beyond float's range
        value = math.inf
    if not math.isfinite(value) or value <= 0:
        raise LoraConfigError(f"alpha must be a finite real number > 0, got {value!r}")
    return value


def weight_dtype(dtype):
    """The dtype a layer keeps for a weight of ``dtype``.

    float32 and float64 are kept; float16 is widened to float32 (exact), since
    BLAS has no half-precision product.  Everything else is refused: integer
    and boolean weights are almost always a mistake, and silent conversion
    would hide it.
    """
    dtype = np.dtype(dtype)
    if dtype in LAYER_DTYPES:
        return dtype
    if dtype == np.float16:
        return np.dtype(np.float32)
    raise LoraDtypeError(
        f"weight must be float16, float32 or float64, got {dtype}; "
        "convert it explicitly, e.g. weight.astype(np.float32)"
    )


def as_array(value, name):
    """``np.asarray(value)``, with NumPy's own complaints turned into numba_lora errors.

    A ragged nested sequence (NumPy raises ValueError) is a LoraDtypeError,
    an object NumPy cannot convert at all (TypeError) a LoraTypeError; both
    name the argument.  The dtype is not checked here.
    """
    try:
        return np.asarray(value)
    except ValueError as exc:
        raise LoraDtypeError(
            f"{name} must be an array of real numbers, got a {type(value).__name__} NumPy cannot "
            f"convert (ragged nested sequences?): {exc}"
        ) from None
    except TypeError as exc:
        raise LoraTypeError(
            f"{name} must be an array of real numbers, got {type(value).__name__}: {exc}"
        ) from None


def checked_weight(weight):
    """(``weight`` as an array, the layer dtype it gets), checked to be 2-D and non-empty.

    Nothing is copied yet: callers check what depends on the shape (the rank)
    before they allocate.
    """
    array = as_array(weight, "weight")
    dtype = weight_dtype(array.dtype)
    if array.ndim != 2:
        raise LoraShapeError(
            f"weight must be 2-D (out_features, in_features), got {array.ndim}-D "
            f"with shape {array.shape}"
        )
    if 0 in array.shape:
        raise LoraShapeError(
            f"weight must have out_features >= 1 and in_features >= 1, got shape {array.shape}"
        )
    return array, dtype


def as_weight(weight, extra_rows=0):
    """A C-contiguous copy of ``weight`` in its layer dtype, checked to be 2-D and non-empty.

    With ``extra_rows``, the copy is the top of a C-contiguous buffer with that
    many more (uninitialised) rows below it, for a layer that stacks its A
    under W; the weight is converted straight into it, with no second copy.
    """
    return stacked_copy(*checked_weight(weight), extra_rows)


def stacked_copy(array, dtype, extra_rows=0):
    """``array`` converted to ``dtype`` into the top of a C-contiguous buffer with
    ``extra_rows`` more (uninitialised) rows; ``array`` comes from :func:`checked_weight`."""
    out_features, in_features = array.shape
    buffer = np.empty((out_features + extra_rows, in_features), dtype=dtype)
    buffer[:out_features] = array
    return buffer


def as_real_array(value, name, dtype):
    """``value`` as an array of ``dtype``; accepts real (integer or float) input only.

    Booleans, complex numbers, strings, objects and ragged lists are refused
    with LoraDtypeError naming ``name``.
    """
    array = as_array(value, name)
    if array.dtype.kind not in "fiu":
        hint = " (a ragged list, None, or mixed objects?)" if array.dtype.kind == "O" else ""
        raise LoraDtypeError(
            f"{name} must hold real numbers (integer or float), got dtype {array.dtype}{hint}"
        )
    return array.astype(dtype, copy=False)


def check_shape(array, expected, name, dim_names):
    """Raise LoraShapeError unless ``array.shape == expected``, naming the wrong dimension."""
    if array.ndim != len(expected):
        raise LoraShapeError(
            f"{name} must be {len(expected)}-D with shape "
            f"({_describe(expected, dim_names)}), got {array.ndim}-D with shape {array.shape}"
        )
    for axis, (got, want, dim) in enumerate(zip(array.shape, expected, dim_names)):
        if want is not None and got != want:
            raise LoraShapeError(
                f"{name} has {dim} = {got} (axis {axis}), expected {want}: "
                f"shape must be ({_describe(expected, dim_names)}), got {array.shape}"
            )


def _describe(expected, dim_names):
    return ", ".join(dim if want is None else f"{dim}={want}" for want, dim in zip(expected, dim_names))


def as_factor(value, name, expected, dim_names, dtype):
    """A C-contiguous, owned copy of a LoRA factor, checked against ``expected``."""
    array = as_real_array(value, name, dtype)
    check_shape(array, expected, name, dim_names)
    return np.array(array, order="C", copy=True)


def check_out(out, expected, dtype, inputs):
    """Check a caller-supplied output array; return it.

    A non-array is a LoraTypeError; a wrong dtype a LoraDtypeError; a wrong
    shape, a non-contiguous, read-only or overlapping array (all questions
    of the memory ``out`` names) a LoraShapeError.
    """
    if not isinstance(out, np.ndarray):
        raise LoraTypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype != dtype:
        raise LoraDtypeError(f"out must have the layer's dtype {dtype}, got {out.dtype}")
    if out.shape != expected:
        raise LoraShapeError(f"out must have shape {expected}, got {out.shape}")
    if not out.flags.c_contiguous:
        raise LoraShapeError("out must be C-contiguous")
    if not out.flags.writeable:
        raise LoraShapeError("out must be writable")
    for array in inputs:
        if np.may_share_memory(out, array):
            raise LoraShapeError("out must not overlap the input or the layer's arrays")
    return out


def as_rng(seed):
    """``numpy.random.default_rng(seed)``, with its refusals as numba_lora errors."""
    try:
        return np.random.default_rng(seed)
    except TypeError as exc:
        raise LoraTypeError(
            f"seed must be None, an int, a SeedSequence or a Generator, got "
            f"{type(seed).__name__} {seed!r}: {exc}"
        ) from None
    except ValueError as exc:
        raise LoraConfigError(f"seed {seed!r} is out of range: {exc}") from None


def check_thread_count(n, limit):
    """Return ``n`` as an int in ``[1, limit]``, or raise a LoraError naming it."""
    if isinstance(n, (bool, np.bool_)):
        raise LoraTypeError(f"n must be an integer thread count, got {n!r}")
    try:
        value = operator.index(n)
    except TypeError:
        raise LoraTypeError(
            f"n must be an integer thread count, got {type(n).__name__} {n!r}") from None
    if not 1 <= value <= limit:
        raise LoraConfigError(f"n must be between 1 and NUMBA_NUM_THREADS={limit}, got {value}")
    return value


def check_scaling(scaling, dtype, what="scaling"):
    """Return ``scaling`` as a float if it is finite in ``dtype``, else raise LoraConfigError.

    The kernels round the scaling once to the layer's dtype; a scaling that
    overflows float32 (``alpha / rank > 3.4e38``) would make every float32
    output NaN, so it is a configuration error, not a numerical accident.
    """
    value = float(scaling)
    with np.errstate(over="ignore"):
        rounded = np.dtype(dtype).type(value)
    if not (math.isfinite(value) and np.isfinite(rounded)):
        raise LoraConfigError(
            f"{what} = {value!r} is not finite in {np.dtype(dtype)} "
            f"(largest finite value {np.finfo(dtype).max:.4g}); lower alpha or raise rank"
        )
    return value
