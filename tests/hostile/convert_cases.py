"""Hostile cases for ``numba_lora.kernels.convert``: half-precision merges and conversions.

bfloat16 and float16 weights travel as their bits in ``uint16`` arrays.  The
references here are independent of the kernels' integer tricks: float16
through NumPy's own ``astype``, bfloat16 rounding by comparing the two
neighbouring bfloat16 values in float64 (ties to even, past the largest
finite value to infinity).  A merge must equal, bit for bit, the exact
float32 merge of the widened W (``exact.exact_update``) rounded once to the
format; NaN may be any NaN.  Raw random bit patterns (every NaN payload,
subnormals, infinities) are among the values.
"""

import math

import numpy as np

from numba_lora import kernels as K

from . import exact
from .kernel_cases import (
    Attack,
    Spec,
    _lora_dims,
    attacks_for,
    kernel_case,
    perturbed_case,
    run_attacks,
    scalar_attacks,
)
from .values import F32, array_values, float_scaling, pick

__all__ = ["convert_cases", "round_bf16", "widen"]

_BF16, _F16 = "bf16", "f16"


def widen(bits, fmt):
    """float32 values of half-precision ``bits``."""
    bits = np.asarray(bits, np.uint16)
    if fmt == _F16:
        return bits.view(np.float16).astype(np.float32)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _bf16_magnitude(m):
    """The value of bfloat16 magnitude bits ``m`` (0..0x7F80) as a float64; 0x7F80 is 2**128."""
    e, f = m >> 7, m & 0x7F
    if e == 0:
        return math.ldexp(f, -133)
    return math.ldexp(128 + f, e - 134)


def round_bf16(x):
    """float32 values to bfloat16 bits, to nearest, ties to even (NaN: 0x7FC0 with the sign)."""
    x = np.asarray(x, np.float32)
    out = np.empty(x.shape, np.uint16)
    flat_x, flat_out = x.ravel(), out.reshape(-1)
    for k, value in enumerate(flat_x.tolist()):
        u = int(flat_x[k:k + 1].view(np.uint32)[0])
        sign = (u >> 16) & 0x8000
        if math.isnan(value):
            flat_out[k] = sign | 0x7FC0
            continue
        a = abs(value)
        m = (u >> 16) & 0x7FFF  # truncated: a lies in [value(m), value(m + 1))
        if math.isinf(a) or a == _bf16_magnitude(m):
            flat_out[k] = sign | m
            continue
        below, above = a - _bf16_magnitude(m), _bf16_magnitude(m + 1) - a
        if below < above or (below == above and m % 2 == 0):
            flat_out[k] = sign | m
        else:
            flat_out[k] = sign | (m + 1)
    return out


def round_bits(values, fmt):
    values = np.asarray(values, np.float32)
    if fmt == _F16:
        with np.errstate(all="ignore"):
            return values.astype(np.float16).view(np.uint16)
    return round_bf16(values)


def _is_nan_bits(bits, fmt):
    bits = np.asarray(bits, np.uint16).astype(np.int64) & 0x7FFF
    return bits > (0x7C00 if fmt == _F16 else 0x7F80)


def same_half_bits(actual, expected, fmt):
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape or actual.dtype != np.uint16:
        return False
    return bool(np.all((actual == expected) | (_is_nan_bits(actual, fmt)
                                                & _is_nan_bits(expected, fmt))))


def half_bits(rng, shape, fmt, mode=None):
    """uint16 bits: raw random patterns, or rounded float values of ``mode``."""
    if rng.random() < 0.3:
        return rng.integers(0, 65536, size=shape).astype(np.uint16)
    return round_bits(array_values(rng, shape, F32, mode), fmt)


def _first_difference(actual, expected):
    differ = np.asarray(actual) != np.asarray(expected)
    idx = tuple(np.argwhere(differ)[0]) if differ.any() else ()
    return (f"{int(differ.sum())} elements differ; first at {list(idx)}: got "
            f"{hex(int(np.asarray(actual)[idx]))}, expected {hex(int(np.asarray(expected)[idx]))}"
            if idx else "shapes or dtypes differ")


# ------------------------------------------------------------------ specs
def _check_merge_half(fmt):
    def check(before, result, args, dtype):
        if result is not None:
            raise AssertionError(f"returned {result!r}, expected None")
        merged = exact.exact_update(widen(before["W"], fmt), before["A"], before["B"],
                                    before["scaling"], 1)
        expected = round_bits(merged, fmt)
        if not same_half_bits(args["W"], expected, fmt):
            raise AssertionError(f"W is not the exact float32 merge rounded to {fmt}: "
                                 + _first_difference(args["W"], expected))
    return check


def _make_merge_half(fmt):
    def make(spec, rng, dtype, mode):
        dims = _lora_dims(rng, spec.shapes)
        return dims, {"W": half_bits(rng, (dims["o"], dims["i"]), fmt, mode),
                      "A": array_values(rng, (dims["r"], dims["i"]), F32, mode),
                      "B": array_values(rng, (dims["o"], dims["r"]), F32, mode),
                      "scaling": float_scaling(rng)}
    return make


_HALF_PARAMS = (("W", "u16_2w"), ("A", "f32_2"), ("B", "f32_2"), ("scaling", "real"))
_HALF_SHAPES = {"W": ("o", "i"), "A": ("r", "i"), "B": ("o", "r")}
MERGES = [Spec(name, fn, _HALF_PARAMS, _HALF_SHAPES, _check_merge_half(fmt),
               _make_merge_half(fmt))
          for name, fn, fmt in (("merge_bf16", K.merge_bf16, _BF16),
                                ("merge_bf16_serial", K.merge_bf16_serial, _BF16),
                                ("merge_f16", K.merge_f16, _F16),
                                ("merge_f16_serial", K.merge_f16_serial, _F16))]


def _check_widen(fmt):
    def check(before, result, args, dtype):
        out = args["out"]
        if not isinstance(result, np.ndarray) or result.shape != out.shape or (
                out.size and not np.shares_memory(result, out)):
            raise AssertionError("did not return out")
        expected = widen(before["bits"], fmt)
        if not exact.same_bits(np.asarray(out), expected):
            raise AssertionError(f"widen_{fmt} is not exact")
    return check


def _check_round(fmt):
    def check(before, result, args, dtype):
        out = args["out"]
        if not isinstance(result, np.ndarray) or result.shape != out.shape or (
                out.size and not np.shares_memory(result, out)):
            raise AssertionError("did not return out")
        expected = round_bits(before["x"], fmt)
        if not same_half_bits(np.asarray(out), expected, fmt):
            raise AssertionError(f"round_{fmt}: " + _first_difference(out, expected))
    return check


def _make_widen(fmt):
    def make(spec, rng, dtype, mode):
        n = pick(rng, {0: 1, 1: 2, 3: 3, 8: 3, 17: 2, 40: 1})
        return {"n": n}, {"bits": half_bits(rng, (n,), fmt, mode),
                          "out": np.full(n, np.nan, np.float32)}
    return make


def _make_round(fmt):
    def make(spec, rng, dtype, mode):
        n = pick(rng, {0: 1, 1: 2, 3: 3, 8: 3, 17: 2, 40: 1})
        if rng.random() < 0.3:  # any float32 bit pattern: NaN payloads, subnormals
            x = rng.integers(0, 2 ** 32, size=n, dtype=np.uint64).astype(np.uint32).view(
                np.float32)
        else:
            x = array_values(rng, (n,), F32, mode)
        return {"n": n}, {"x": x, "out": np.zeros(n, np.uint16)}
    return make


CONVERSIONS = [
    Spec("widen_bf16", K.widen_bf16, (("bits", "u16_1"), ("out", "f32_1w")),
         {"bits": ("n",), "out": ("n",)}, _check_widen(_BF16), _make_widen(_BF16)),
    Spec("widen_f16", K.widen_f16, (("bits", "u16_1"), ("out", "f32_1w")),
         {"bits": ("n",), "out": ("n",)}, _check_widen(_F16), _make_widen(_F16)),
    Spec("round_bf16", K.round_bf16, (("x", "f32_1"), ("out", "u16_1w")),
         {"x": ("n",), "out": ("n",)}, _check_round(_BF16), _make_round(_BF16)),
    Spec("round_f16", K.round_f16, (("x", "f32_1"), ("out", "u16_1w")),
         {"x": ("n",), "out": ("n",)}, _check_round(_F16), _make_round(_F16)),
]


def convert_cases(rng):
    """kernels.convert: merges into bfloat16/float16 bits and the exact conversions."""
    for spec in MERGES:
        for _ in range(90):
            yield kernel_case(spec, rng, None)
        for _ in range(12):
            yield perturbed_case(spec, rng, None)
    for spec in MERGES:
        made = spec.make(spec, rng, None, "normal")
        attacks = attacks_for(spec, rng, None, made, n_dtype=2, n_nonarray=1)
        keep = rng.permutation(len(attacks))[: max(2, len(attacks) // 5)]
        yield from run_attacks(lambda: spec, rng, lambda: None, [attacks[i] for i in keep])
        yield from run_attacks(lambda: spec, rng, lambda: None, scalar_attacks(spec, rng, 1, ()))
    for spec in CONVERSIONS:
        for _ in range(150):
            yield kernel_case(spec, rng, None)
        for _ in range(15):
            yield perturbed_case(spec, rng, None)
        made = spec.make(spec, rng, None, "normal")
        attacks = attacks_for(spec, rng, None, made, n_dtype=1, n_nonarray=1)
        name = spec.params[0][0]
        # Read element by element: strided arrays are fine.
        attacks.append((Attack(f"{name} strided", "correct", layout={name: "strided"}), 8))
        yield from run_attacks(lambda: spec, rng, lambda: None, attacks)

