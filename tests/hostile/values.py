"""Seeded value generators shared by the case modules: arrays, specials, scalings."""

import numpy as np

__all__ = ["MODES", "array_values", "pick", "float_scaling"]

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)

#: How an array's values are drawn, and how often.
MODES = {
    "normal": 0.45,
    "ints": 0.10,
    "zeros": 0.05,
    "specials": 0.15,
    "wide": 0.10,
    "subnormal": 0.05,
    "huge": 0.10,
}


def _specials(dtype):
    info = np.finfo(dtype)
    return np.array([np.nan, np.inf, -np.inf, info.max, -info.max, info.smallest_subnormal,
                     -info.smallest_subnormal, -0.0, 0.0, info.tiny, float(info.max) / 3])


def pick(rng, options, weights=None):
    """One of ``options`` (a sequence or a {option: weight} dict), seeded."""
    if isinstance(options, dict):
        keys = list(options)
        p = np.array([options[k] for k in keys], dtype=float)
        return keys[int(rng.choice(len(keys), p=p / p.sum()))]
    return options[int(rng.integers(len(options)))]


def array_values(rng, shape, dtype, mode=None):
    """An array of ``shape`` and ``dtype`` with values drawn in ``mode`` (see :data:`MODES`)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if mode == "huge":
            return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
        return rng.integers(max(info.min, -3), 4, size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"no values for dtype {dtype}")
    mode = mode or pick(rng, MODES)
    work = F32 if dtype.itemsize <= 4 else F64
    info = np.finfo(work)
    with np.errstate(all="ignore"):
        if mode == "ints":
            v = rng.integers(-3, 4, size=shape).astype(np.float64)
        elif mode == "zeros":
            v = np.where(rng.random(shape) < 0.5, -0.0, 0.0)
        elif mode == "specials":
            v = rng.standard_normal(shape)
            specials = _specials(work)
            mask = rng.random(shape) < 0.25
            v[mask] = specials[rng.integers(len(specials), size=int(mask.sum()))]
        elif mode == "wide":
            span = 30 if work == F32 else 250
            v = rng.standard_normal(shape) * 10.0 ** rng.uniform(-span, span, size=shape)
        elif mode == "subnormal":
            v = rng.standard_normal(shape) * float(info.smallest_subnormal) * 64
        elif mode == "huge":
            v = rng.standard_normal(shape) * float(info.max) / 8
        else:
            v = rng.standard_normal(shape)
        return np.asarray(v).astype(dtype)


#: Python float scalings, with weights: mostly ordinary, some at the edges.
FLOAT_SCALINGS = {
    1.0: 6, 0.5: 4, -2.0: 3, 3.25: 3, 1e-3: 2, 0.0: 2, -0.0: 2, 16.0: 2,
    1e308: 1, -1e308: 1, float("inf"): 1, float("-inf"): 1, float("nan"): 1,
    5e-324: 1, 1e-45: 1, 3.4e38: 1, 3.5e38: 1, 2.0 ** -149: 1, 1e-300: 1,
}


def float_scaling(rng):
    return pick(rng, FLOAT_SCALINGS)
