"""Array-like arguments for the layer-level API, valid and hostile, with what each should give.

:func:`real_input` gives what a caller might pass where an array of real
numbers of a given shape is wanted (``x``, ``X``, ``lora_a``, ``weight``,
...): a valid value (another dtype, a list, a strided or read-only view,
NaN and infinity, big-endian) together with the array the layer should
compute with, or a hostile one (a wrong shape, a non-real dtype, ``None``,
a ragged list, a string) that must be refused.
"""

import fractions
from dataclasses import dataclass
from typing import Any

import numpy as np

from .memory import place
from .values import array_values, pick

__all__ = ["Input", "real_input", "out_input", "converted", "PASSTHROUGH"]


@dataclass
class Input:
    what: str
    value: Any
    expect: str  # "correct" (valid) or "error"
    #: For a valid input: the array the layer should compute with.
    converted: Any = None
    region: Any = None


def converted(value, dtype):
    """What ``as_real_array(value, ..., dtype)`` gives: ``np.asarray(value).astype(dtype)``."""
    return np.asarray(value).astype(dtype)


_VALID = {"same": 8, "float": 3, "int": 2, "list": 2, "rows": 1, "strided": 1, "fortran": 1,
          "readonly": 1, "bigendian": 1, "matrix": 1, "guarded": 2}
#: For inputs a layer hands to a kernel as they are (x, X): no read-only arrays, whose
#: Numba type differs and would compile every kernel once more (the kernel groups
#: cover read-only inputs).
PASSTHROUGH = {k: v for k, v in _VALID.items() if k != "readonly"}
_HOSTILE = {"shape": 6, "ndim": 3, "dtype": 5, "python": 4, "empty": 1}
_BAD_DTYPES = ("?", "c8", "c16", "<U3", "S2", "M8[s]", "m8[ms]", [("a", "<f8")], "O")


def _python_junk(rng, shape):
    options = [None, "abc", b"abc", {}, set(), object(), [[1.0, 2.0], [3.0]], [1.0, None],
               ["1", "2"], [2 ** 70] * max(1, shape[-1] if shape else 1), fractions.Fraction(1, 2),
               1j, [1j, 2j]]
    return options[int(rng.integers(len(options)))]


def real_input(rng, shape, dtype, name, hostile=False, mode=None, kinds=None):
    """A valid (or, with ``hostile``, an invalid) value for an array argument of ``shape``."""
    shape = tuple(shape)
    dtype = np.dtype(dtype)
    if not hostile:
        kind = pick(rng, kinds or _VALID)
        base = array_values(rng, shape, dtype, mode)
        if kind == "float":
            other = np.dtype(pick(rng, ["f2", "f4", "f8", "g"]))
            value = array_values(rng, shape, other if other.itemsize <= 8 else np.float64,
                                 mode).astype(other)
        elif kind == "int":
            value = array_values(rng, shape, np.dtype(pick(rng, ["i1", "i4", "i8", "u1", "u8"])),
                                 pick(rng, [None, None, "huge"]))
        elif kind == "list" and base.size:  # an empty list would lose the shape
            value = base.astype(np.float64).tolist()
            if len(shape) == 1 and rng.random() < 0.5:
                value = tuple(value)
        elif kind == "rows" and base.ndim == 2 and base.shape[0]:  # a tuple of row arrays
            value = tuple(base)
        elif kind == "strided" and base.ndim >= 1:
            wide = np.zeros(shape[:-1] + (2 * shape[-1],), dtype)
            wide[..., ::2] = base
            value = wide[..., ::2]
        elif kind == "fortran":
            value = np.asfortranarray(base)
        elif kind == "readonly":
            value = base.copy()
            value.flags.writeable = False
        elif kind == "bigendian":
            value = base.astype(dtype.newbyteorder(">"))
        elif kind == "matrix" and base.ndim == 2:
            value = np.asmatrix(base)
        elif kind == "guarded":
            value, region = place(base, at_end=bool(rng.integers(2)))
            return Input(f"{name} {dtype} in guarded memory", value, "correct",
                         converted(value, dtype), region)
        else:
            kind, value = "same", base
        return Input(f"{name} {kind} {np.asarray(value).dtype}{list(np.shape(value))}", value,
                     "correct", converted(value, dtype))
    kind = pick(rng, _HOSTILE)
    if kind == "shape" and shape:
        bad = list(shape)
        axis = int(rng.integers(len(bad)))
        if bad[axis] == 0 or rng.random() < 0.5:
            bad[axis] += 1
        else:
            bad[axis] -= 1
        if len(bad) == 2 and rng.random() < 0.3 and shape[0] != shape[1]:
            bad = [shape[1], shape[0]]
        value = array_values(rng, tuple(bad), dtype)
        return Input(f"{name} shape {tuple(bad)} (wants {shape})", value, "error")
    if kind in ("shape", "ndim"):
        options = [(), (1,) + shape, shape + (1,), shape[:-1]] if shape else [(1,), (1, 1)]
        bad = pick(rng, [s for s in options if len(s) != len(shape)])
        value = array_values(rng, bad, dtype)
        if bad == () and rng.random() < 0.5:
            value = float(value)
        return Input(f"{name} {len(bad)}-D {bad} (wants {shape})", value, "error")
    if kind == "dtype":
        bad = np.dtype(pick(rng, _BAD_DTYPES))
        if bad.kind in "bc":
            value = array_values(rng, shape, bad)
        elif bad.kind == "O":
            value = np.empty(shape, object)
            value[...] = 1.5
        else:
            value = np.zeros(shape, bad)
        return Input(f"{name} dtype {bad}", value, "error")
    if kind == "empty" and shape:
        bad = list(shape)
        bad[int(rng.integers(len(bad)))] = 0
        if tuple(bad) != shape:
            return Input(f"{name} empty {tuple(bad)} (wants {shape})",
                         np.zeros(tuple(bad), dtype), "error")
    value = _python_junk(rng, shape)
    return Input(f"{name} = {type(value).__name__} {str(value)[:40]}", value, "error")


def out_input(rng, shape, dtype, hostile=False):
    """An ``out`` argument: None or a fitting array (valid), or one that must be refused."""
    shape = tuple(shape)
    dtype = np.dtype(dtype)
    if not hostile:
        kind = pick(rng, {"none": 4, "guarded": 4, "plain": 1, "matrix": 1})
        if kind == "none":
            return Input("out None", None, "correct")
        if kind == "matrix" and len(shape) == 2:
            return Input("out np.matrix", np.asmatrix(np.full(shape, np.nan, dtype)), "correct")
        if kind == "plain":
            return Input("out plain", np.full(shape, np.nan, dtype), "correct")
        value, region = place(np.full(shape, np.nan, dtype), at_end=bool(rng.integers(2)))
        return Input("out guarded", value, "correct", region=region)
    kind = pick(rng, {"dtype": 3, "shape": 3, "layout": 2, "readonly": 2, "python": 1})
    if kind == "dtype":
        bad = np.dtype(pick(rng, ["f4" if dtype.itemsize == 8 else "f8", "f2", "i4", "i8",
                                  "c16", "?", ">f4" if dtype.itemsize == 4 else ">f8"]))
        value, region = place(np.zeros(shape, bad))
        return Input(f"out dtype {bad}", value, "error", region=region)
    if kind == "shape":
        options = [shape + (1,), shape[:-1], (1,) + shape]
        if shape:
            bigger = list(shape)
            bigger[-1] += 1
            options.append(tuple(bigger))
            if shape[-1] > 1:
                smaller = list(shape)
                smaller[-1] -= 1
                options.append(tuple(smaller))
        bad = pick(rng, options)
        value, region = place(np.full(bad, np.nan, dtype))
        return Input(f"out shape {bad} (wants {shape})", value, "error", region=region)
    if kind == "layout" and shape and shape[-1] > 1 and all(shape):
        value, region = place(np.full(shape, np.nan, dtype), layout="strided")
        return Input("out strided", value, "error", region=region)
    if kind == "readonly":
        value, region = place(np.full(shape, np.nan, dtype))
        value.flags.writeable = False
        return Input("out read-only", value, "error", region=region)
    value = pick(rng, [[0.0] * (shape[-1] if shape else 1), (0.0,), 0.0, "out", np.float64(0)])
    return Input(f"out = {type(value).__name__}", value, "error")
