"""Hostile cases for ``LoraLinear``: the constructor, forwards, setters, merge/unmerge, states.

Cases come in sessions: one layer, put into a random state (merged or not,
enabled or not, factors with ordinary or extreme values), then a run of
operations on it, valid and hostile mixed, each one case.  Every expectation
is computed from the layer's state just before the call: the float64
reference for a forward, the exact merge arithmetic for merge, unmerge and
a factor set while merged (refused exactly when the result would not be
finite), the state machine for merge twice / unmerge when unmerged.  A
refused call must leave ``weight``, ``lora_a``, ``lora_b``, ``is_merged``,
``is_enabled`` and the caller's arrays bit-identical.
"""

import fractions
import math

import numpy as np

from numba_lora import LoraLinear

from . import exact
from .harness import Case, Watch
from .inputs import PASSTHROUGH, out_input, real_input
from .values import F32, F64, array_values, pick

__all__ = ["constructor_cases", "session_cases", "layer_state", "watch_layer"]


# ------------------------------------------------------------ shared helpers
def layer_state(layer):
    return (layer.weight, layer.lora_a, layer.lora_b, layer.is_merged, layer.is_enabled,
            layer.scaling, layer.rank, layer.alpha, layer.use_rslora)


def watch_layer(watch, layer, prefix="layer", always=False):
    watch.state(f"{prefix}.weight", lambda: layer.weight, always)
    watch.state(f"{prefix}.lora_a", lambda: layer.lora_a, always)
    watch.state(f"{prefix}.lora_b", lambda: layer.lora_b, always)
    watch.state(f"{prefix}.is_merged", lambda: layer.is_merged, always)
    watch.state(f"{prefix}.is_enabled", lambda: layer.is_enabled, always)
    watch.state(f"{prefix}.scaling/rank/alpha",
                lambda: (layer.scaling, layer.rank, layer.alpha, layer.use_rslora), always)


def kernel_scaling(merged, enabled, scaling):
    """The scaling a forward applies on top of the current W (see LoraLinear._kernel_scaling)."""
    if merged:
        return 0.0 if enabled else -scaling
    return scaling if enabled else 0.0


def watch_input(watch, name, inp):
    if inp.region is not None:
        watch.region(name, inp.region, is_input=True)
    else:
        watch.input(name, inp.value)


def watch_out(watch, out):
    if out.region is not None:
        watch.region("out", out.region, is_input=False)
    elif out.value is not None:
        watch.state("out", lambda: out.value)


# ---------------------------------------------------------------- constructor
_RANK_BAD = [0, -1, True, np.bool_(True), 2.0, "2", None, 1j, np.float64(2.0), [2], 2 ** 70]
_ALPHA_GOOD = [1, 0.5, 16.0, np.float32(2.0), np.int64(3), 1e-300, fractions.Fraction(1, 3),
               np.float16(2.0), np.uint8(4)]
_ALPHA_BAD = [0, -1.0, -0.0, math.inf, -math.inf, math.nan, True, "1", None, 1j, 2 ** 2000,
              [1.0], np.bool_(True)]
_SEED_GOOD = [None, 0, 12345, 2 ** 200, np.int64(5), [1, 2], "rng", "seedseq"]
_SEED_BAD = [-1, "abc", 2.5, object(), [1, -1], 1j, np.float64(1.0)]
_RSLORA_GOOD = [True, False, np.True_, np.False_]
#: Not bools: refused, never read as truthy or falsy.
FLAGS_BAD = ["no", None, 0, 1, "True", [], np.float64(1.0)]


def _seed_value(seed, rng_source):
    if seed == "rng":
        return np.random.default_rng(int(rng_source.integers(1000)))
    if seed == "seedseq":
        return np.random.SeedSequence(int(rng_source.integers(1000)))
    return seed


def constructor_case(rng):
    dtype = np.dtype(pick(rng, {np.float32: 4, np.float64: 4, np.float16: 1}))
    o, i = int(rng.integers(1, 7)), int(rng.integers(1, 7))
    weight = real_input(rng, (o, i), dtype, "weight",
                        kinds={"same": 6, "list": 1, "rows": 1, "strided": 1, "fortran": 1,
                               "readonly": 1, "matrix": 1, "guarded": 1})
    rank = int(rng.integers(1, min(o, i) + 1))
    rank_value = pick(rng, [rank, rank, np.int64(rank), np.uint8(rank), np.int8(rank)])
    alpha = pick(rng, _ALPHA_GOOD)
    seed = pick(rng, _SEED_GOOD)
    rslora = pick(rng, _RSLORA_GOOD)
    field = pick(rng, {"valid": 3, "weight": 4, "rank": 2, "alpha": 2, "seed": 1.5,
                       "use_rslora": 1})
    expect, names, what = "correct", (), "valid"
    if field == "weight":
        if rng.random() < 0.5:
            weight = real_input(rng, (o, i), dtype, "weight", hostile=True)
        else:  # real input the layer still refuses: integers, or non-native byte order
            bad = np.dtype(pick(rng, ["i4", "i8", "u1", ">f4", ">f8", "g"]))
            weight = real_input(rng, (o, i), dtype, "weight")
            weight.value = np.asarray(weight.converted).astype(bad)
            weight.what = f"weight dtype {bad}"
            weight.expect = "error"
        expect, names, what = weight.expect, ("weight",), weight.what
    elif field == "rank":
        rank_value = pick(rng, _RANK_BAD + [min(o, i) + 1])
        expect, names, what = "error", ("rank",), f"rank = {rank_value!r}"
    elif field == "alpha":
        alpha = pick(rng, _ALPHA_BAD + [1e39 * rank])  # the last: scaling overflows float32
        expect, names, what = "error", ("alpha",), f"alpha = {alpha!r}"
    elif field == "seed":
        seed = pick(rng, _SEED_BAD)
        expect, names, what = "error", ("seed",), f"seed = {seed!r}"
    elif field == "use_rslora":
        rslora = pick(rng, FLAGS_BAD)
        expect, names, what = "error", ("use_rslora",), f"use_rslora = {rslora!r}"
    seed_value = _seed_value(seed, rng)
    # Documented behaviour counts as correct: float16 is widened, float32 and
    # float64 kept; alpha / rank must stay finite in the layer's dtype.
    if weight.expect == "error" and isinstance(weight.value, np.ndarray) \
            and weight.value.dtype.kind == "f" and weight.value.dtype.isnative \
            and weight.value.dtype.itemsize <= 8 and weight.value.ndim == 2 \
            and min(weight.value.shape) >= rank:
        # Another shape is just another weight: valid while rank fits.
        weight.expect, expect, names, what = "correct", "correct", (), "weight of another shape"
        o, i = weight.value.shape
    given = np.asarray(weight.value).dtype if weight.expect == "correct" else F32
    layer_dtype = F64 if given == F64 else F32
    if alpha == 1e39 * rank and layer_dtype == F64:
        expect, names = "correct", ()  # finite in float64
    if expect == "correct":
        scaling = float(alpha) / (math.sqrt(rank) if rslora else rank)
        if not np.isfinite(np.float32(scaling) if layer_dtype == F32 else scaling):
            expect, names = "error", ("alpha",)
    watch = Watch()
    watch.input("weight", weight.value) if weight.region is None else watch.region(
        "weight", weight.region, True)

    def call():
        return LoraLinear(weight.value, rank_value, alpha, seed=seed_value, use_rslora=rslora)

    def check(layer):
        expected_w = np.asarray(weight.value).astype(layer_dtype)
        problems = []
        if layer.dtype != layer_dtype:
            problems.append(f"dtype {layer.dtype}, expected {layer_dtype}")
        elif not exact.same_bits(layer.weight, expected_w):
            problems.append("weight is not the input converted to the layer's dtype")
        if layer.rank != rank or type(layer.rank) is not int:
            problems.append(f"rank {layer.rank!r}, expected {rank}")
        want = float(alpha) / (math.sqrt(rank) if rslora else rank)
        if not math.isclose(layer.scaling, want, rel_tol=1e-15):
            problems.append(f"scaling {layer.scaling!r}, expected {want!r}")
        if layer.use_rslora is not bool(rslora):
            problems.append(f"use_rslora {layer.use_rslora!r}, expected {bool(rslora)}")
        if layer.lora_b.shape != (o, rank) or np.any(layer.lora_b != 0):
            problems.append("lora_b is not zeros of (out_features, rank)")
        bound = 1 / math.sqrt(i) * (1 + 1e-6)
        if layer.lora_a.shape != (rank, i) or not np.all(np.abs(layer.lora_a) <= bound):
            problems.append("lora_a is not Kaiming-uniform of (rank, in_features)")
        if layer.is_merged or not layer.is_enabled:
            problems.append("a new layer must be unmerged and enabled")
        if isinstance(seed, (int, np.integer)) and seed is not None:
            again = LoraLinear(expected_w, rank, alpha, seed=seed)
            if not exact.same_bits(again.lora_a, layer.lora_a):
                problems.append("the same seed gave another lora_a")
        if problems:
            raise AssertionError("; ".join(problems))

    return Case("LoraLinear()", f"LoraLinear {dtype} ({o}, {i}) rank {rank_value!r}: {what}",
                call, expect, check, names, watch)


# ---------------------------------------------------------------- sessions
def _new_layer(rng, dtype):
    o = pick(rng, {1: 2, 2: 3, 3: 3, 4: 3, 5: 2, 7: 2, 9: 1, 17: 1})
    i = pick(rng, {1: 2, 2: 3, 3: 3, 4: 3, 5: 2, 7: 2, 9: 1, 16: 1})
    rank = int(rng.integers(1, min(o, i) + 1))
    layer = LoraLinear(array_values(rng, (o, i), dtype, pick(rng, {"normal": 8, "ints": 1,
                                                                    "specials": 1})),
                       rank, pick(rng, [1.0, 2.0, 16.0, 0.5]), seed=int(rng.integers(1000)),
                       use_rslora=bool(rng.integers(2)))
    mode = pick(rng, {"normal": 10, "ints": 2, "specials": 1, "huge": 1, "zeros": 1})
    layer.lora_b = array_values(rng, (o, rank), dtype, mode)
    if rng.random() < 0.3:
        layer.lora_a = array_values(rng, (rank, i), dtype, mode)
    if rng.random() < 0.5:
        layer.merge()
    if rng.random() < 0.3:
        layer.disable()
    return layer


def _forward_case(rng, layer, op):
    dtype, o, i = layer.dtype, layer.out_features, layer.in_features
    hostile_x = rng.random() < 0.3
    hostile_out = not hostile_x and rng.random() < 0.25
    if op == "forward":
        x = real_input(rng, (i,), dtype, "x", hostile=hostile_x, kinds=PASSTHROUGH)
        ndims = (1,)
        call = (lambda: layer.forward(x.value, out=out.value))
    elif op == "forward_batch":
        b = pick(rng, [0, 1, 2, 3, 5])
        x = real_input(rng, (b, i), dtype, "X", hostile=hostile_x, kinds=PASSTHROUGH)
        ndims = (2,)
        call = (lambda: layer.forward_batch(x.value, out=out.value))
    else:  # __call__ with (..., in_features)
        lead = pick(rng, [(), (2,), (3,), (0,), (2, 2), (1, 3)])
        x = real_input(rng, lead + (i,), dtype, "x", hostile=hostile_x, kinds=PASSTHROUGH)
        ndims = (1, 2, 3, 4)
        call = (lambda: layer(x.value, out=out.value))
    if hostile_x and isinstance(x.value, np.ndarray) and x.value.dtype.kind == "f" \
            and x.value.ndim in ndims and x.value.shape[-1] == i:
        # A "wrong" batch size or lead shape is still (..., in_features): valid.
        x.expect, x.converted = "correct", x.value.astype(dtype)
    out_shape = (np.shape(x.converted)[:-1] if x.expect == "correct" else ()) + (o,)
    out = out_input(rng, out_shape, dtype, hostile=hostile_out)
    if rng.random() < 0.04 and not hostile_x and np.asarray(x.converted).ndim == 1 \
            and x.expect == "correct":
        # out overlapping x (both the layer's dtype, contiguous): refused.
        buf = np.zeros(o + i, dtype)
        x.value, x.region = buf[o - 1:o - 1 + i], None
        x.value[...] = x.converted
        out.value, out.region, out.what, out.expect = buf[:o], None, "out overlaps x", "error"
    if rng.random() < 0.02 and x.expect == "correct" and out_shape == (o,) and op == "forward":
        out.value, out.region, out.what, out.expect = layer.weight.reshape(-1)[:o], None, \
            "out = a view of layer.weight", "error"
    expect = "error" if "error" in (x.expect, out.expect) else "correct"
    names = ("x", "X") if x.expect == "error" else ("out",)
    W0, A0, B0 = layer.weight.copy(), layer.lora_a.copy(), layer.lora_b.copy()
    k = kernel_scaling(layer.is_merged, layer.is_enabled, layer.scaling)
    watch = Watch()
    watch_layer(watch, layer, always=True)  # a forward never changes its layer
    watch_input(watch, "x", x)
    watch_out(watch, out)

    def check(result):
        if not isinstance(result, np.ndarray) or result.dtype != dtype:
            raise AssertionError(f"returned {type(result).__name__} "
                                 f"{getattr(result, 'dtype', '')}, expected {dtype} array")
        if out.value is not None and not (np.shares_memory(result, out.value)
                                          or np.asarray(out.value).size == 0):
            raise AssertionError("did not write into out")
        xs = np.asarray(x.converted)
        lead = xs.shape[:-1]
        flat = xs.reshape(-1, i) if xs.ndim != 1 else xs
        res = np.asarray(result)
        if res.shape != lead + (o,):
            raise AssertionError(f"result shape {res.shape}, expected {lead + (o,)}")
        exact.check_forward(res.reshape(flat.shape[:-1] + (o,)), W0, A0, B0, k, flat, dtype)

    state = f"{'merged' if layer.is_merged else 'unmerged'}/" \
            f"{'enabled' if layer.is_enabled else 'disabled'}"
    return Case(f"LoraLinear.{op}", f"{op} {dtype} ({o}, {i}) r{layer.rank} {state}: "
                f"{x.what}; {out.what}", call, expect, check, names, watch)


def _setter_case(rng, layer):
    dtype, o, i, r = layer.dtype, layer.out_features, layer.in_features, layer.rank
    which = pick(rng, ["a", "b"])
    name = f"lora_{which}"
    shape = (r, i) if which == "a" else (o, r)
    hostile = rng.random() < 0.4
    mode = pick(rng, {"normal": 6, "specials": 2, "huge": 2, "wide": 1, "zeros": 1})
    inp = real_input(rng, shape, dtype, name, hostile=hostile, mode=mode)
    how = pick(rng, ["property", "method"])
    W0, A0, B0 = layer.weight.copy(), layer.lora_a.copy(), layer.lora_b.copy()
    merged = layer.is_merged
    expect, names = inp.expect, (name,)
    expected_w = W0
    if expect == "correct":
        new = np.asarray(inp.converted)
        A1, B1 = (new, B0) if which == "a" else (A0, new)
        if merged:
            s = layer.scaling
            expected_w = exact.exact_update(exact.exact_update(W0, A0, B0, s, -1), A1, B1, s, 1)
            if exact.nonfinite(expected_w):
                expect, names = "error", ("lora_a", "lora_b")  # LoraNonFiniteError
    watch = Watch()
    watch_layer(watch, layer)
    watch_input(watch, name, inp)

    def call():
        if how == "property":
            setattr(layer, name, inp.value)
        else:
            getattr(layer, f"set_{name}")(inp.value)

    def check(result):
        got = layer.lora_a if which == "a" else layer.lora_b
        if not exact.same_bits(got, np.asarray(inp.converted)):
            raise AssertionError(f"{name} is not the value converted to {dtype}")
        other = layer.lora_b if which == "a" else layer.lora_a
        if not exact.same_bits(other, B0 if which == "a" else A0):
            raise AssertionError("the other factor changed")
        if not exact.same_bits(layer.weight, expected_w):
            raise AssertionError("weight is not the exact unmerge + merge" if merged
                                 else "weight changed although the layer is not merged")
        if layer.is_merged != merged:
            raise AssertionError("is_merged changed")

    return Case(f"LoraLinear.{name} =", f"{name} ({how}) {dtype} {'merged' if merged else ''}: "
                f"{inp.what}", call, expect, check, names, watch)


def _merge_case(rng, layer, op):
    W0, A0, B0 = layer.weight.copy(), layer.lora_a.copy(), layer.lora_b.copy()
    s = layer.scaling
    merged = layer.is_merged
    watch = Watch()
    watch_layer(watch, layer)
    if op == "merge":
        check_finite = pick(rng, [False, True, True, np.True_, np.False_, pick(rng, FLAGS_BAD)])
        expected = exact.exact_update(W0, A0, B0, s, 1)
        if merged:
            expect, names = "error", ("merge", "merged")
        elif not isinstance(check_finite, (bool, np.bool_)):
            expect, names = "error", ("check_finite",)
        elif check_finite and exact.nonfinite(expected):
            expect, names = "error", ("merge",)
        else:
            expect, names = "correct", ()
        call = (lambda: layer.merge(check_finite=check_finite))
        what = f"merge(check_finite={check_finite!r})"
    else:
        expected = exact.exact_update(W0, A0, B0, s, -1)
        expect, names = ("correct", ()) if merged else ("error", ("unmerge", "merged"))
        call = layer.unmerge
        what = "unmerge()"

    def check(result):
        if result is not None:
            raise AssertionError(f"{op} returned {result!r}")
        if not exact.same_bits(layer.weight, expected):
            raise AssertionError(f"weight is not the exact {op} of the weight before")
        if layer.is_merged != (op == "merge"):
            raise AssertionError(f"is_merged is {layer.is_merged} after {op}")
        if not (exact.same_bits(layer.lora_a, A0) and exact.same_bits(layer.lora_b, B0)):
            raise AssertionError(f"{op} changed a factor")

    return Case(f"LoraLinear.{op}", f"{what} {layer.dtype} {'merged' if merged else 'unmerged'}"
                f" nonfinite={exact.nonfinite(expected)}", call, expect, check, names, watch)


def _toggle_case(rng, layer):
    op = pick(rng, ["enable", "disable"])
    W0, A0, B0, merged = layer.weight.copy(), layer.lora_a.copy(), layer.lora_b.copy(), \
        layer.is_merged
    watch = Watch()

    def check(result):
        if result is not None or layer.is_enabled != (op == "enable"):
            raise AssertionError(f"{op}() left is_enabled = {layer.is_enabled}")
        if not (exact.same_bits(layer.weight, W0) and exact.same_bits(layer.lora_a, A0)
                and exact.same_bits(layer.lora_b, B0) and layer.is_merged == merged):
            raise AssertionError(f"{op}() changed the weights or the merge state")

    return Case(f"LoraLinear.{op}", f"{op}() {'merged' if merged else 'unmerged'}",
                getattr(layer, op), "correct", check, (), watch)


def session(rng, n_ops, dtype):
    layer = _new_layer(rng, dtype)
    for _ in range(n_ops):
        op = pick(rng, {"forward": 4, "forward_batch": 4, "__call__": 3, "setter": 5,
                        "merge": 2, "unmerge": 2, "toggle": 1})
        if op in ("forward", "forward_batch", "__call__"):
            yield _forward_case(rng, layer, op)
        elif op == "setter":
            yield _setter_case(rng, layer)
        elif op in ("merge", "unmerge"):
            yield _merge_case(rng, layer, op)
        else:
            yield _toggle_case(rng, layer)


def constructor_cases(rng, n=350):
    """LoraLinear(...): no kernel runs, so these go with the other API-only cases."""
    for _ in range(n):
        yield constructor_case(rng)


def session_cases(rng, dtype, n_sessions=80):
    """LoraLinear operations of ``dtype`` layers, in sessions of 4-12 calls."""
    for _ in range(n_sessions):
        yield from session(rng, int(rng.integers(4, 13)), dtype)
