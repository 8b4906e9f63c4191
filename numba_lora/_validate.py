"""Validation and conversion of user input; every check names what it expected and what came."""

import math
import numbers
import operator

import numpy as np

from .errors import LoraConfigError, LoraDtypeError, LoraShapeError

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
    """Return ``name`` if it is a non-empty string, else raise LoraConfigError naming ``what``."""
    if not isinstance(name, str) or not name:
        raise LoraConfigError(f"{what} name must be a non-empty string, got {name!r}")
    return name


def check_alpha(alpha):
    """Return ``alpha`` as a finite float > 0, or raise LoraConfigError."""
    if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, numbers.Real):
        raise LoraConfigError(
            f"alpha must be a finite real number > 0, got {type(alpha).__name__} {alpha!r}"
        )
    value = float(alpha)
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


def as_weight(weight):
    """A C-contiguous copy of ``weight`` in its layer dtype, checked to be 2-D and non-empty."""
    array = np.asarray(weight)
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
    return np.array(array, dtype=dtype, order="C", copy=True)


def as_real_array(value, name, dtype):
    """``value`` as an array of ``dtype``; accepts real (integer or float) input only."""
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise LoraDtypeError(
            f"{name} must hold real numbers (integer or float), got dtype {array.dtype}"
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
    """Check a caller-supplied output array; return it."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype != dtype:
        raise LoraDtypeError(f"out must have the layer's dtype {dtype}, got {out.dtype}")
    if out.shape != expected:
        raise LoraShapeError(f"out must have shape {expected}, got {out.shape}")
    if not out.flags.c_contiguous:
        raise LoraShapeError("out must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError("out must be writable")
    for array in inputs:
        if np.may_share_memory(out, array):
            raise ValueError("out must not overlap the input or the layer's arrays")
    return out


def check_scaling(scaling, dtype, what="scaling"):
    """Return ``scaling`` as a float if it is finite in ``dtype``, else raise LoraConfigError.

    The kernels round the scaling once to the layer's dtype; a scaling that
    overflows float32 (``alpha / rank > 3.4e38``) would make every float32
    output NaN, so it is a configuration error, not a numerical accident.
    """
    value = float(scaling)
    rounded = np.dtype(dtype).type(value)
    if not (math.isfinite(value) and np.isfinite(rounded)):
        raise LoraConfigError(
            f"{what} = {value!r} is not finite in {np.dtype(dtype)} "
            f"(largest finite value {np.finfo(dtype).max:.4g}); lower alpha or raise rank"
        )
    return value
