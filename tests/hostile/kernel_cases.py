"""Hostile cases for ``numba_lora.kernels``: shapes, values, and a bounded set of types.

Every new combination of argument *types* makes Numba compile a kernel again
(a refused combination compiles only a function that raises, ~0.1 s; an
accepted one the whole kernel, 1-6 s), while new shapes and values of the
same types cost nothing.  So each group spends most of its cases on shapes
and values of the plain float32/float64 types, and runs a bounded list of
type attacks (wrong ndim, dtype, layout, writability, non-arrays, scalar
types), each a few times with different shapes.

Every array argument is placed in guarded memory (``memory.place``): against
a ``PROT_NONE`` page, with canaries around it, and for inputs with read-only
pages, so a read past the end, or any write to an input, faults.
"""

from dataclasses import dataclass, field
from typing import Callable

import numba
import numpy as np

from numba_lora import kernels as K

from . import exact
from .harness import Case, Watch
from .memory import place
from .values import F32, F64, array_values, float_scaling, pick

__all__ = ["forward_cases", "merge_cases", "multi_cases", "KNOWN_BAD_DTYPES"]

#: Argument kinds: (ndim, dtype rule, written to).
KINDS = {
    "f1": (1, "float", False), "f2": (2, "float", False),
    "f1w": (1, "float", True), "f2w": (2, "float", True),
    "i64": (1, np.dtype(np.int64), False), "f64": (1, F64, False),
    "real": (0, None, False), "int": (0, None, False),
    # kernels.convert: half-precision bits as uint16, float32 factors.
    "u16_1": (1, np.dtype(np.uint16), False), "u16_1w": (1, np.dtype(np.uint16), True),
    "u16_2w": (2, np.dtype(np.uint16), True), "f32_1": (1, F32, False),
    "f32_1w": (1, F32, True), "f32_2": (2, F32, False),
}
#: Kinds whose arrays need not be contiguous (read element by element).
STRIDES_OK = ("i64", "f64", "u16_1", "u16_1w", "f32_1", "f32_1w")

#: Dtypes the guard cannot see because Numba fails before it (reported as
#: bugs by the xfail tests in test_hostile.py), kept out of these cases.
KNOWN_BAD_DTYPES = (np.float16, np.longdouble, object, ">f4", ">f8", ">i8")

#: Wrong dtypes for a float array (the other float dtype is added per case).
FLOAT_DTYPE_ATTACKS = ("i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "?", "c8", "c16",
                       "<U1", "S1", "M8[s]", "m8[s]", [("a", "<f8")])
INT_DTYPE_ATTACKS = ("f8", "i4", "u8", "i1", "?", "c16", "f4", "M8[s]")
F64_DTYPE_ATTACKS = ("f4", "i8", "c16", "?", "u8")
FIXED_DTYPE_ATTACKS = ("f8", "f4", "i2", "u2", "u4", "i8", "?", "c8", "M8[s]", "<U1")


def _non_arrays():
    return [None, [1.0, 2.0], (1.0, 2.0), "ab", b"ab", 1.5, 3, memoryview(np.ones(2)),
            bytearray(8), {1.0}]


#: Scalings that must be refused, and ones of other types that must work.
BAD_SCALINGS = [True, np.bool_(True), 1j, np.complex128(1), None, "1", np.array(1.0), [1.0],
                (1.0,)]
GOOD_SCALING_TYPES = [2, np.float32(0.5), np.int8(-2), np.uint64(7), np.int16(3), 2 ** 63]
BAD_COUNTS = [True, 1.0, np.float64(2.0), None, "2", 1j, np.array(2)]


@dataclass
class Spec:
    """A kernel: its parameters (name, kind), shapes by dimension name, reference check."""

    name: str
    fn: Callable
    params: tuple
    shapes: dict
    check: Callable  # (before, result, args, dtype) -> None
    make: Callable = None  # (rng, dtype, mode) -> (dims, {name: value}); default: lora dims
    #: Other names an error message may use for a parameter.
    aliases: dict = field(default_factory=dict)


@dataclass
class Attack:
    what: str
    expect: str
    names: tuple = ()
    replace: dict = field(default_factory=dict)
    layout: dict = field(default_factory=dict)
    readonly: tuple = ()


# --------------------------------------------------------------- references
def _returned_out(result, out):
    """The kernels return ``out`` itself (for an empty one: an array of its shape)."""
    if not isinstance(result, np.ndarray) or result.shape != out.shape:
        raise AssertionError(f"did not return out (returned {type(result).__name__})")
    if out.size and not np.shares_memory(result, out):
        raise AssertionError("returned an array other than out")


def _check_forward(before, result, args, dtype):
    out = args["out"]
    _returned_out(result, out)
    X = before["x"] if "x" in before else before["X"]
    exact.check_forward(out, before["W"], before["A"], before["B"], before["scaling"], X, dtype)


def _check_stacked(before, result, args, dtype):
    out = args["out"]
    _returned_out(result, out)
    WA, B = before["WA"], before["B"]
    o = B.shape[0]
    X = before["x"] if "x" in before else before["X"]
    exact.check_forward(out, WA[:o], WA[o:], B, before["scaling"], X, dtype)


def _check_merge(sign):
    def check(before, result, args, dtype):
        if result is not None:
            raise AssertionError(f"returned {result!r}, expected None")
        expected = exact.exact_update(before["W"], before["A"], before["B"], before["scaling"],
                                      sign)
        if not exact.same_bits(args["W"], expected):
            got = np.asarray(args["W"])
            differ = ~((got == expected) | (np.isnan(got) & np.isnan(expected)))
            idx = tuple(np.argwhere(differ)[0]) if differ.any() else ()
            raise AssertionError(
                f"W differs from the exact {'merge' if sign > 0 else 'unmerge'} in "
                f"{int(differ.sum())} elements; first at {list(idx)}: got "
                f"{got[idx] if idx else '?'!r}, expected {expected[idx] if idx else '?'!r}")
    return check


def _check_count(before, result, args, dtype):
    merged = exact.exact_update(before["W"], before["A"], before["B"], before["scaling"], 1)
    expected = exact.nonfinite(merged)
    if not isinstance(result, (int, np.integer)) or result != expected:
        raise AssertionError(f"count {result!r}, expected {expected}")


def _check_recount(before, result, args, dtype):
    s = before["scaling"]
    W = exact.exact_update(before["W"], before["A_old"], before["B_old"], s, -1)
    expected = exact.nonfinite(exact.exact_update(W, before["A_new"], before["B_new"], s, 1))
    if not isinstance(result, (int, np.integer)) or result != expected:
        raise AssertionError(f"count {result!r}, expected {expected}")


def _check_multi(before, result, args, dtype):
    out = args["out"]
    _returned_out(result, out)
    offsets, scalings = before["offsets"], before["scalings"]
    adapters = [(before["A_cat"][offsets[i]:offsets[i + 1]],
                 before["BT_cat"][offsets[i]:offsets[i + 1]].T, float(scalings[i]))
                for i in range(len(scalings))]
    exact.check_multi(out, before["W"], adapters, before["X"], before["ids"], dtype)


def _check_group(before, result, args, dtype):
    ids, n = before["ids"], int(before["n_adapters"])
    order = [b for i in range(n) for b in range(len(ids)) if ids[b] == i]
    starts = np.zeros(n + 1, np.int64)
    for i in range(n):
        starts[i + 1] = starts[i] + int(np.count_nonzero(ids == i))
    got_order, got_starts = result
    if list(got_order) != order or not np.array_equal(got_starts, starts):
        raise AssertionError(f"group_rows gave {list(got_order)}, {list(got_starts)}; "
                             f"expected {order}, {list(starts)}")


# -------------------------------------------------------------------- specs
_LORA = (("W", "f2"), ("A", "f2"), ("B", "f2"), ("scaling", "real"))
_LORA_W = (("W", "f2w"), ("A", "f2"), ("B", "f2"), ("scaling", "real"))
_LORA_SHAPES = {"W": ("o", "i"), "A": ("r", "i"), "B": ("o", "r")}

FORWARD = Spec("forward", K.forward, _LORA + (("x", "f1"), ("out", "f1w")),
               dict(_LORA_SHAPES, x=("i",), out=("o",)), _check_forward)
FORWARD_BATCH = Spec("forward_batch", K.forward_batch, _LORA + (("X", "f2"), ("out", "f2w")),
                     dict(_LORA_SHAPES, X=("b", "i"), out=("b", "o")), _check_forward)
_STACKED_SHAPES = {"WA": ("o+r", "i"), "B": ("o", "r")}


def _make_stacked(spec, rng, dtype, mode):
    dims = _lora_dims(rng, ())
    dims["o+r"] = dims["o"] + dims["r"]
    values = {"WA": array_values(rng, (dims["o+r"], dims["i"]), dtype, mode),
              "B": array_values(rng, (dims["o"], dims["r"]), dtype, mode),
              "scaling": float_scaling(rng)}
    for name in spec.shapes:
        if name not in values:
            shape = tuple(dims[d] for d in spec.shapes[name])
            values[name] = np.full(shape, np.nan, dtype) if name == "out" else \
                array_values(rng, shape, dtype, mode)
    return dims, values


FORWARD_STACKED = Spec(
    "forward_stacked", K.forward_stacked,
    (("WA", "f2"), ("B", "f2"), ("scaling", "real"), ("x", "f1"), ("out", "f1w")),
    dict(_STACKED_SHAPES, x=("i",), out=("o",)), _check_stacked, _make_stacked)
FORWARD_BATCH_STACKED = Spec(
    "forward_batch_stacked", K.forward_batch_stacked,
    (("WA", "f2"), ("B", "f2"), ("scaling", "real"), ("X", "f2"), ("out", "f2w")),
    dict(_STACKED_SHAPES, X=("b", "i"), out=("b", "o")), _check_stacked, _make_stacked)

MERGES = [Spec(name, fn, _LORA_W, dict(_LORA_SHAPES), _check_merge(sign))
          for name, fn, sign in (("merge", K.merge, 1), ("unmerge", K.unmerge, -1),
                                 ("merge_serial", K.merge_serial, 1),
                                 ("unmerge_serial", K.unmerge_serial, -1))]
COUNT = Spec("count_nonfinite_merged", K.count_nonfinite_merged, _LORA, dict(_LORA_SHAPES),
             _check_count)
RECOUNT = Spec("count_nonfinite_remerged", K.count_nonfinite_remerged,
               (("W", "f2"), ("A_old", "f2"), ("B_old", "f2"), ("A_new", "f2"), ("B_new", "f2"),
                ("scaling", "real")),
               {"W": ("o", "i"), "A_old": ("r", "i"), "B_old": ("o", "r"), "A_new": ("q", "i"),
                "B_new": ("o", "q")}, _check_recount,
               # The shape messages say "A" and "B", not which pair is wrong
               # (test_hostile.py::test_count_nonfinite_remerged_names_the_pair): accepted here.
               aliases={"A_old": ("A",), "B_old": ("B",), "A_new": ("A",), "B_new": ("B",)})

_MULTI_PARAMS = (("W", "f2"), ("A_cat", "f2"), ("BT_cat", "f2"), ("offsets", "i64"),
                 ("scalings", "f64"), ("X", "f2"), ("ids", "i64"), ("out", "f2w"))
_MULTI_SHAPES = {"W": ("o", "i"), "A_cat": ("R", "i"), "BT_cat": ("R", "o"),
                 "offsets": ("N1",), "scalings": ("N",), "X": ("b", "i"), "ids": ("b",),
                 "out": ("b", "o")}


def _lora_dims(rng, names):
    dims = {
        "o": pick(rng, {0: 1, 1: 3, 2: 3, 3: 3, 4: 3, 5: 3, 7: 2, 8: 2, 9: 2, 13: 2}),
        "i": pick(rng, {0: 1, 1: 3, 2: 3, 3: 3, 5: 3, 8: 2, 16: 2, 17: 2, 33: 2, 40: 1}),
        "r": pick(rng, {0: 1, 1: 4, 2: 4, 3: 3, 4: 2, 5: 2, 8: 1}),
        "q": pick(rng, {0: 1, 1: 3, 2: 3, 3: 2}),
        "b": pick(rng, {0: 1, 1: 4, 2: 3, 3: 3, 5: 2, 8: 1}),
    }
    roll = rng.random()
    if "W" in names and roll < 0.03:  # the blocked chain above rank 192
        dims.update(o=pick(rng, [1, 2, 5]), i=pick(rng, [1, 3, 17]), r=int(rng.integers(193, 200)))
    elif "W" in names and roll < 0.06:  # more than one column tile
        dims.update(o=pick(rng, [1, 2, 9]), i=int(rng.integers(1025, 1040)), r=pick(rng, [1, 2]))
    return dims


def _make_lora(spec, rng, dtype, mode):
    dims = _lora_dims(rng, spec.shapes)
    values = {}
    for name, kind in spec.params:
        if kind == "real":
            values[name] = float_scaling(rng)
        elif name == "out":
            values[name] = np.full(tuple(dims[d] for d in spec.shapes[name]), np.nan, dtype)
        else:
            values[name] = array_values(rng, tuple(dims[d] for d in spec.shapes[name]), dtype,
                                        mode)
    return dims, values


def _make_multi(spec, rng, dtype, mode):
    n = pick(rng, {0: 1, 1: 3, 2: 3, 3: 2, 4: 2})
    ranks = [pick(rng, {0: 1, 1: 3, 2: 3, 3: 2, 4: 1}) for _ in range(n)]
    dims = _lora_dims(rng, ())
    dims.update(N=n, N1=n + 1, R=sum(ranks))
    if rng.random() < 0.3:  # many rows per adapter: the segmented path pays
        dims["b"] = pick(rng, [6, 9, 12])
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = np.cumsum(ranks)
    scalings = np.array([pick(rng, {1.0: 4, 0.5: 3, -2.0: 2, 0.0: 1, 1e-3: 1, 8.0: 1})
                         for _ in range(n)], np.float64)
    ids = rng.integers(-1, n, size=dims["b"]).astype(np.int64)
    values = {
        "W": array_values(rng, (dims["o"], dims["i"]), dtype, mode),
        "A_cat": array_values(rng, (dims["R"], dims["i"]), dtype, mode),
        "BT_cat": array_values(rng, (dims["R"], dims["o"]), dtype, mode),
        "offsets": offsets, "scalings": scalings,
        "X": array_values(rng, (dims["b"], dims["i"]), dtype, mode),
        "ids": ids, "out": np.full((dims["b"], dims["o"]), np.nan, dtype),
    }
    return dims, values


MULTIS = [Spec(name, fn, _MULTI_PARAMS, _MULTI_SHAPES, _check_multi, _make_multi)
          for name, fn in (("forward_batch_multi", K.forward_batch_multi),
                           ("forward_batch_multi_segmented", K.forward_batch_multi_segmented),
                           ("forward_batch_multi_rows", K.forward_batch_multi_rows))]


def _make_group(spec, rng, dtype, mode):
    n = pick(rng, {0: 1, 1: 2, 2: 3, 3: 3, 5: 2, 40: 1})
    b = pick(rng, {0: 1, 1: 2, 3: 3, 8: 3, 20: 1})
    ids = rng.integers(-1, max(n, 0), size=b).astype(np.int64) if n else np.full(b, -1, np.int64)
    return {"b": b}, {"ids": ids, "n_adapters": n}


GROUP_ROWS = Spec("group_rows", K.group_rows, (("ids", "i64"), ("n_adapters", "int")),
                  {"ids": ("b",)}, _check_group, _make_group)


# -------------------------------------------------------------- case building
def typesig(args):
    parts = []
    for a in args:
        try:
            parts.append(str(numba.typeof(a)))
        except Exception:  # noqa: BLE001 - untypeable values are themselves attacks
            parts.append(f"untypeable {type(a).__name__}")
    return "(" + ", ".join(parts) + ")"


def _copy(value):
    return np.array(value, copy=True) if isinstance(value, np.ndarray) else value


def kernel_case(spec, rng, dtype, attack=None, mode=None, made=None):
    """One call of ``spec``'s kernel: valid arguments of ``dtype``, changed by ``attack``."""
    dims, values = made if made is not None else (spec.make or _make_lora)(spec, rng, dtype, mode)
    attack = attack or Attack("valid", "correct")
    watch = Watch()
    args = {}
    contiguous_needed = []
    for name, kind in spec.params:
        value = attack.replace.get(name, values[name])
        written = KINDS[kind][2]
        if isinstance(value, np.ndarray) and not value.dtype.hasobject:
            array, region = place(value, at_end=bool(rng.integers(2)),
                                  readonly_pages=not written,
                                  layout=attack.layout.get(name, "C"))
            if name in attack.readonly:
                array.flags.writeable = False
            watch.region(name, region, is_input=not written)
            if name in attack.layout and kind not in STRIDES_OK:
                contiguous_needed.append(array.flags.c_contiguous)
            value = array
        else:
            watch.input(name, value)
        args[name] = value
    expect = attack.expect
    if attack.layout and expect == "error" and all(contiguous_needed):
        expect = "correct"  # a 1-wide or empty array is contiguous whatever its strides
    before = {name: _copy(v) for name, v in args.items()}
    ordered = [args[name] for name, _ in spec.params]
    shape_text = " ".join(f"{k}={v}" for k, v in dims.items() if k in ("o", "i", "r", "q", "b",
                                                                          "N", "n"))
    dtype_text = np.dtype(dtype).name if dtype is not None else "-"
    return Case(
        area=f"kernels.{spec.name}",
        what=f"{spec.name} {dtype_text} {shape_text}: {attack.what}",
        call=lambda: spec.fn(*ordered),
        expect=expect,
        check=lambda result: spec.check(before, result, args, np.dtype(dtype)),
        names=attack.names,
        watch=watch,
        sig=f"{spec.name}{typesig(ordered)}",
    )


def _partners(spec, name, axis):
    dim = spec.shapes[name][axis]
    names = tuple(n for n, dims in spec.shapes.items() if dim in dims)
    return names + tuple(a for n in names for a in spec.aliases.get(n, ()))


def perturbed_case(spec, rng, dtype):
    """One array's dimension off by one: always a LoraShapeError (every dimension is shared)."""
    dims, values = (spec.make or _make_lora)(spec, rng, dtype, "normal")
    arrays = [n for n, k in spec.params if KINDS[k][0] >= 1 and n in spec.shapes]
    name = pick(rng, arrays)
    shape = list(values[name].shape)
    axis = int(rng.integers(len(shape)))
    delta = pick(rng, [-1, 1]) if shape[axis] > 0 else 1
    shape[axis] += delta
    old = values[name]
    if old.dtype.kind == "i":
        new = np.resize(old, shape).astype(old.dtype) if old.size else np.zeros(shape, old.dtype)
        if name == "ids":
            new = np.clip(new, -1, None)
    else:
        new = array_values(rng, tuple(shape), old.dtype, "normal")
    attack = Attack(f"{name} axis {axis} {'+1' if delta > 0 else '-1'}", "error",
                    _partners(spec, name, axis), replace={name: new})
    return kernel_case(spec, rng, dtype, attack, made=(dims, values))


# ------------------------------------------------------------------ attacks
def _wrong_ndim(spec, rng, dtype, name, kind):
    values = {}
    ndim = KINDS[kind][0]
    dt = dtype if KINDS[kind][1] == "float" else KINDS[kind][1]
    for nd in (0, 2 if ndim == 1 else 1, 3):
        shape = tuple(int(rng.integers(1, 4)) for _ in range(nd))
        values[nd] = np.zeros(shape, dt) if dt.kind == "i" else array_values(rng, shape, dt)
    return [Attack(f"{name} {nd}-D", "error", (name,), replace={name: v})
            for nd, v in values.items()]


def _wrong_dtype(rng, spec, dtype, name, kind, shape):
    rule = KINDS[kind][1]
    if rule == "float":
        options = list(FLOAT_DTYPE_ATTACKS) + [F64 if dtype == F32 else F32]
    elif rule == np.dtype(np.int64):
        options = list(INT_DTYPE_ATTACKS)
    elif rule == F64:
        options = list(F64_DTYPE_ATTACKS)
    else:
        options = [d for d in FIXED_DTYPE_ATTACKS if np.dtype(d) != rule]
    dt = np.dtype(pick(rng, options))
    if dt.kind in "fiubc":
        value = array_values(rng, shape, dt)
    else:
        value = np.zeros(shape, dt)
    return Attack(f"{name} dtype {dt}", "error", (name,), replace={name: value})


def attacks_for(spec, rng, dtype, dims_values, n_dtype=6, n_nonarray=4, n_ndim=1):
    """The type attacks on ``spec``: (attack, repeat count) pairs."""
    dims, values = dims_values
    out = []
    arrays = [(n, k) for n, k in spec.params if KINDS[k][0] >= 1]
    for name, kind in arrays:
        wrong = _wrong_ndim(spec, rng, dtype, name, kind)
        out += [(wrong[int(i)], 2) for i in rng.permutation(len(wrong))[:n_ndim]]
    for _ in range(n_dtype):
        name, kind = pick(rng, arrays)
        out.append((_wrong_dtype(rng, spec, dtype, name, kind, values[name].shape), 2))
    non_arrays = _non_arrays()
    for _ in range(n_nonarray):
        name, _kind = pick(rng, arrays)
        value = non_arrays[int(rng.integers(len(non_arrays)))]
        out.append((Attack(f"{name} = {type(value).__name__} {value!r}", "error", (name,),
                           replace={name: value}), 2))
    for name, kind in spec.params:
        if KINDS[kind][2]:
            out.append((Attack(f"{name} read-only (flag)", "error", (name,),
                               readonly=(name,)), 3))
    return out


def scalar_attacks(spec, rng, n_bad, good):
    """Refused scalings (or counts), and accepted ones of other types (each compiles)."""
    name, kind = next((n, k) for n, k in spec.params if k in ("real", "int"))
    pool = BAD_SCALINGS if kind == "real" else BAD_COUNTS
    chosen = rng.choice(len(pool), size=min(n_bad, len(pool)), replace=False)
    attacks = [(Attack(f"{name} = {type(pool[i]).__name__} {pool[i]!r}", "error", (name,),
                       replace={name: pool[i]}), 2) for i in chosen]
    for value in good:
        attacks.append((Attack(f"{name} = {type(value).__name__} {value!r}", "correct",
                               replace={name: value}), 12))
    return attacks


def run_attacks(spec_for, rng, dtype_for, attacks_list):
    """Cases for (attack, repeat) pairs; ``spec_for()``/``dtype_for()`` pick per attack."""
    for attack, repeat in attacks_list:
        spec, dtype = spec_for(), dtype_for()
        for _ in range(repeat):
            yield kernel_case(spec, rng, dtype, attack)


# ------------------------------------------------------------------- groups
def _valid(spec, rng, dtypes, n):
    for k in range(n):
        yield kernel_case(spec, rng, dtypes[k % len(dtypes)])


def _perturbed(spec, rng, dtypes, n):
    for k in range(n):
        yield perturbed_case(spec, rng, dtypes[k % len(dtypes)])


def _typed(spec, rng, dtype, n_dtype=5, n_nonarray=3, n_bad_scalar=5, good=(), layouts=(),
           readonly_inputs=(), n_ndim=1):
    made = (spec.make or _make_lora)(spec, rng, dtype, "normal")
    attacks = attacks_for(spec, rng, dtype, made, n_dtype, n_nonarray, n_ndim)
    attacks += scalar_attacks(spec, rng, n_bad_scalar, good)
    for name, layout, expect in layouts:
        attacks.append((Attack(f"{name} {layout} layout", expect, (name,),
                               layout={name: layout}), 6))
    if readonly_inputs:
        attacks.append((Attack(f"{', '.join(readonly_inputs)} read-only inputs (flag)",
                               "correct", readonly=tuple(readonly_inputs)), 12))
    yield from run_attacks(lambda: spec, rng, lambda: dtype, attacks)


def forward_cases(rng, dtype):
    """forward, forward_batch and the stacked pair, for one dtype."""
    for spec, n_valid, n_perturbed in ((FORWARD, 200, 35), (FORWARD_STACKED, 130, 25),
                                       (FORWARD_BATCH, 180, 35),
                                       (FORWARD_BATCH_STACKED, 130, 25)):
        yield from _valid(spec, rng, (dtype,), n_valid)
        yield from _perturbed(spec, rng, (dtype,), n_perturbed)
    # Type attacks: each dtype leads on two of the four kernels.
    if dtype == F32:
        yield from _typed(FORWARD, rng, F32, n_dtype=4, n_nonarray=2, n_bad_scalar=4,
                          good=[2, np.uint64(7)],
                          layouts=[("W", "F", "error"), ("out", "strided", "error")])
        yield from _typed(FORWARD_BATCH, rng, F32, n_dtype=2, n_nonarray=1, n_bad_scalar=2,
                          n_ndim=0, layouts=[("out", "F", "error")],
                          readonly_inputs=("A", "B"))
        yield from _typed(FORWARD_BATCH_STACKED, rng, F32, n_dtype=2, n_nonarray=1,
                          n_bad_scalar=2, n_ndim=0, good=[np.int64(2)],
                          layouts=[("X", "F", "error")])
    else:
        yield from _typed(FORWARD_BATCH, rng, F64, n_dtype=4, n_nonarray=2, n_bad_scalar=4,
                          good=[2], layouts=[("X", "F", "error"), ("out", "strided", "error")])
        yield from _typed(FORWARD, rng, F64, n_dtype=2, n_nonarray=1, n_bad_scalar=2,
                          n_ndim=0, good=[np.float32(0.5)],
                          layouts=[("x", "strided", "error")], readonly_inputs=("W", "x"))
        yield from _typed(FORWARD_STACKED, rng, F64, n_dtype=2, n_nonarray=1, n_bad_scalar=2,
                          n_ndim=0, good=[1], layouts=[("WA", "F", "error")])


def _merge_group(rng, dtype, extra):
    specs = MERGES + [COUNT, RECOUNT]
    for spec in specs:
        yield from _valid(spec, rng, (dtype,), 110 if spec in MERGES else 120)
        yield from _perturbed(spec, rng, (dtype,), 14)
    # Type attacks: each on one of the six kernels, so that refused combinations stay few.
    for spec in specs:
        made = _make_lora(spec, rng, dtype, "normal")
        attacks = attacks_for(spec, rng, dtype, made, n_dtype=2, n_nonarray=1)
        keep = rng.permutation(len(attacks))[: max(2, len(attacks) // 5)]
        yield from run_attacks(lambda: spec, rng, lambda: dtype, [attacks[i] for i in keep])
        yield from run_attacks(lambda: spec, rng, lambda: dtype,
                               scalar_attacks(spec, rng, 1, ()))
    for spec, attack, repeat in extra:
        yield from run_attacks(lambda: spec, rng, lambda: dtype, [(attack, repeat)])


def merge_cases(rng, dtype):
    """merge, unmerge, *_serial, count_nonfinite_*, for one dtype."""
    yield from (_merge_f32 if dtype == F32 else _merge_f64)(rng)


def _merge_f32(rng):
    yield from _merge_group(rng, F32, [
        (MERGES[3], Attack("scaling = int", "correct", replace={"scaling": 3}), 12),
        (COUNT, Attack("W read-only (flag; documented as allowed)", "correct",
                       readonly=("W",)), 12),
    ])


def _merge_f64(rng):
    yield from _merge_group(rng, F64, [
        (MERGES[2], Attack("scaling = np.uint64", "correct",
                           replace={"scaling": np.uint64(5)}), 12),
    ])


def _multi_content_cases(rng, dtypes):
    """offsets, scalings and ids that are wrong in value, not in type."""
    for k in range(150):
        spec = MULTIS[k % 3]
        dtype = dtypes[k % len(dtypes)]
        dims, values = _make_multi(spec, rng, dtype, "normal")
        offsets, ids = values["offsets"].copy(), values["ids"].copy()
        n, b = len(values["scalings"]), len(ids)
        choice = int(rng.integers(9))
        names = ("offsets",)
        if choice == 0:
            offsets[0] = pick(rng, [-1, 1, 2 ** 62])
            what = f"offsets[0] = {offsets[0]}"
        elif choice == 1:
            offsets[-1] += pick(rng, [-1, 1, 1000])
            what = f"offsets[-1] = {offsets[-1]} (A_cat has {dims['R']} rows)"
            names = ("offsets", "A_cat")
        elif choice == 2 and n >= 2 and offsets[1] < offsets[2]:
            offsets[1] = offsets[2] + 1  # decreasing: overlapping segments
            what = f"offsets not sorted {list(offsets)}"
        elif choice == 3 and n >= 2:
            offsets[1:-1] = -pick(rng, [1, 5, 2 ** 40])
            what = f"negative inner offsets {list(offsets)}"
        elif choice == 4 and b:
            ids[int(rng.integers(b))] = pick(rng, [n, n + 1, -2, -(2 ** 63), 2 ** 63 - 1, 2 ** 40])
            what = f"ids out of range {list(ids)} for {n} adapters"
            names = ("ids", "id")
        elif choice == 5:
            new = np.append(values["scalings"], 1.0) if rng.random() < 0.5 else \
                values["scalings"][:-1]
            if len(new) == n:
                continue
            values["scalings"] = new
            what = f"{len(new)} scalings for {n + 1} offsets"
            names = ("offsets", "scalings")
        elif choice == 6:
            offsets = np.append(offsets, offsets[-1])
            what = f"offsets one too long {list(offsets)}"
        elif choice == 7:
            values["BT_cat"] = array_values(rng, (dims["R"] + 1, dims["o"]), dtype)
            what = "BT_cat one row more than A_cat"
            names = ("BT_cat", "A_cat")
        else:
            values["scalings"] = np.where(rng.random(n) < 0.5, np.nan, values["scalings"])
            yield kernel_case(spec, rng, dtype, Attack("NaN scalings", "correct"),
                              made=(dims, values))
            continue
        values["offsets"], values["ids"] = offsets, ids
        yield kernel_case(spec, rng, dtype, Attack(what, "error", names), made=(dims, values))


def multi_cases(rng):
    """The three multi-adapter kernels and group_rows."""
    for spec in MULTIS:
        yield from _valid(spec, rng, (F32, F64), 130)
        yield from _perturbed(spec, rng, (F32, F64), 20)
    yield from _multi_content_cases(rng, (F32, F64))
    for spec, dtype in zip(MULTIS, (F32, F64, F32)):
        made = _make_multi(spec, rng, dtype, "normal")
        attacks = attacks_for(spec, rng, dtype, made, n_dtype=4, n_nonarray=2)
        keep = rng.permutation(len(attacks))[: len(attacks) // 4]
        yield from run_attacks(lambda: spec, rng, lambda: dtype, [attacks[i] for i in keep])
    # offsets, scalings and ids need not be contiguous: accepted, each one compile.
    for spec, dtype, name in ((MULTIS[2], F64, "ids"), (MULTIS[1], F64, "scalings")):
        yield from run_attacks(lambda: spec, rng, lambda: dtype,
                               [(Attack(f"{name} strided", "correct",
                                        layout={name: "strided"}), 15)])
    yield from run_attacks(lambda: MULTIS[1], rng, lambda: F32,
                           [(Attack("A_cat F layout", "error", ("A_cat",),
                                    layout={"A_cat": "F"}), 6)])
    yield from run_attacks(lambda: MULTIS[0], rng, lambda: F64,
                           [(Attack("out strided", "error", ("out",),
                                    layout={"out": "strided"}), 6)])
    # group_rows: values, then types.
    for _ in range(160):
        dims, values = _make_group(GROUP_ROWS, rng, None, None)
        if values["ids"].size and rng.random() < 0.3:
            values["ids"][int(rng.integers(values["ids"].size))] = pick(
                rng, [-2, values["n_adapters"], -(2 ** 63), 2 ** 63 - 1])
            yield kernel_case(GROUP_ROWS, rng, None, Attack("id out of range", "error",
                                                            ("ids", "id")), made=(dims, values))
        elif rng.random() < 0.1:
            values["n_adapters"] = -int(pick(rng, [1, 2, 2 ** 40]))
            yield kernel_case(GROUP_ROWS, rng, None,
                              Attack("negative n_adapters", "error", ("n_adapters",)),
                              made=(dims, values))
        else:
            yield kernel_case(GROUP_ROWS, rng, None, made=(dims, values))
    made = _make_group(GROUP_ROWS, rng, None, None)
    attacks = attacks_for(GROUP_ROWS, rng, None, made, n_dtype=2, n_nonarray=2)
    # ids are drawn below 40: these counts are large enough for any of them.
    attacks += scalar_attacks(GROUP_ROWS, rng, 3, [np.int32(40), np.uint64(40)])
    attacks.append((Attack("ids strided", "correct", layout={"ids": "strided"}), 10))
    yield from run_attacks(lambda: GROUP_ROWS, rng, lambda: None, attacks)


