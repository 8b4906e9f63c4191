"""Hostile cases for ``MultiLoraLinear``: constructor, adapters in and out, ids, paths.

A session keeps a model of the adapters it expects (name, A, B, scaling, in
order) beside the layer, updates it only when a call is accepted, and
checks every forward row by row against the float64 reference of that
model.  A refused call must leave the weight, the adapter names and the
packed adapter arrays bit-identical.
"""

import math

import numpy as np

from numba_lora import LoraLinear, MultiLoraLinear

from . import exact
from .harness import Case, Watch
from .inputs import PASSTHROUGH, out_input, real_input
from .layer_cases import _ALPHA_BAD, _ALPHA_GOOD, watch_input, watch_out
from .values import F32, F64, array_values, pick

__all__ = ["layer_cases"]

_ID_NAMES = ("adapter_ids", "adapter id", "adapter")


def _watch_multi(watch, m, always=False):
    watch.state("multi.weight", lambda: m.weight, always)
    watch.state("multi.adapter_names", lambda: m.adapter_names, always)
    watch.state("multi.packed", lambda: [m._packed.A_cat, m._packed.BT_cat, m._packed.offsets,
                                         m._packed.scalings, list(m._packed.ranks)], always)


class Session:
    def __init__(self, rng):
        self.rng = rng
        self.dtype = pick(rng, [F32, F64])
        self.o = pick(rng, {1: 2, 2: 3, 3: 3, 4: 3, 5: 2, 8: 1, 13: 1})
        self.i = pick(rng, {1: 2, 2: 3, 3: 3, 4: 3, 6: 2, 9: 1, 17: 1})
        self.W = array_values(rng, (self.o, self.i), self.dtype, pick(rng, {"normal": 9,
                                                                             "specials": 1}))
        self.m = MultiLoraLinear(self.W)
        self.model = []  # (name, A, B, scaling)
        self.counter = 0
        for _ in range(int(rng.integers(0, 4))):
            name, A, B, alpha, rslora = self._fresh_adapter()
            self.m.add_adapter(name, A, B, alpha, use_rslora=rslora)
            self.model.append((name, A, B, alpha / (math.sqrt(len(A)) if rslora else len(A))))

    def _fresh_name(self):
        self.counter += 1
        return pick(self.rng, ["a", "cust", "x.y", "ünï", "name with space", "0"]) + \
            str(self.counter)

    def _fresh_adapter(self):
        r = int(self.rng.integers(1, 5))
        mode = pick(self.rng, {"normal": 8, "ints": 1, "specials": 1})
        return (self._fresh_name(), array_values(self.rng, (r, self.i), self.dtype, mode),
                array_values(self.rng, (self.o, r), self.dtype, mode),
                pick(self.rng, [1.0, 2.0, 8.0, 0.5]), bool(self.rng.integers(2)))

    def names(self):
        return [entry[0] for entry in self.model]

    # ------------------------------------------------------------ operations
    def add_adapter(self):
        rng, dtype = self.rng, self.dtype
        name, A, B, alpha, rslora = self._fresh_adapter()
        r = A.shape[0]
        a_in = real_input(rng, A.shape, dtype, "A")
        b_in = real_input(rng, B.shape, dtype, "B")
        alpha = pick(rng, _ALPHA_GOOD)
        if dtype == F32 and alpha == 1e-300:
            # A scaling that rounds to 0 in float32 makes the per-row path give NaN
            # where the segmented path skips the adapter (test_hostile.py::
            # test_multi_rows_path_skips_a_scaling_that_rounds_to_zero): kept out here.
            alpha = 1e-30
        field = pick(rng, {"valid": 8, "name": 2, "A": 3, "B": 3, "alpha": 2, "use_rslora": 1})
        expect, names = "correct", ()
        if field == "name":
            name = pick(rng, ["", None, 1, b"a", ("a",)] + self.names()[:1] * 3)
            expect, names = "error", ("name", "adapter")
        elif field == "A":
            a_in = real_input(rng, A.shape, dtype, "A", hostile=True)
            expect, names = "error", ("A", "B")
        elif field == "B":
            b_in = real_input(rng, B.shape, dtype, "B", hostile=True)
            expect, names = "error", ("B",)
        elif field == "alpha":
            alpha = pick(rng, _ALPHA_BAD + [1e39 * r])
            overflow_only = isinstance(alpha, float) and alpha == 1e39 * r
            expect, names = ("correct", ()) if overflow_only and dtype == F64 else \
                ("error", ("alpha",))
        elif field == "use_rslora":
            rslora = pick(rng, ["no", None, 0, 1, "True"])
            expect, names = "error", ("use_rslora",)
        if expect == "correct":
            scaling = float(alpha) / (math.sqrt(r) if rslora else r)
            limit = np.finfo(dtype).max
            if not scaling <= limit:
                expect, names = "error", ("alpha",)
        watch = Watch()
        _watch_multi(watch, self.m)
        watch_input(watch, "A", a_in)
        watch_input(watch, "B", b_in)

        def call():
            return self.m.add_adapter(name, a_in.value, b_in.value, alpha, use_rslora=rslora)

        def check(result):
            A1, B1 = np.asarray(a_in.converted), np.asarray(b_in.converted)
            self.model.append((name, A1, B1, scaling))
            if self.m.adapter_names != self.names():
                raise AssertionError(f"adapter_names {self.m.adapter_names}, expected "
                                     f"{self.names()}")
            if not math.isclose(self.m.scaling(name), scaling, rel_tol=1e-15) \
                    or self.m.rank(name) != r:
                raise AssertionError("scaling or rank of the new adapter is wrong")
            packed = self.m._packed
            k = self.m.adapter_names.index(name)
            r0, r1 = packed.offsets[k], packed.offsets[k + 1]
            if not (exact.same_bits(packed.A_cat[r0:r1], A1)
                    and exact.same_bits(packed.BT_cat[r0:r1], B1.T)):
                raise AssertionError("the packed factors are not the given ones, converted")

        return Case("MultiLoraLinear.add_adapter",
                    f"add_adapter {dtype} ({self.o}, {self.i}) {field}: name {name!r}, "
                    f"{a_in.what}, {b_in.what}, alpha {alpha!r}, use_rslora {rslora!r}",
                    call, expect, check, names, watch)

    def add_layer(self):
        rng, dtype = self.rng, self.dtype
        name = self._fresh_name()
        kind = pick(rng, {"valid": 5, "other dtype": 2, "shape": 2, "not a layer": 2,
                          "name": 1, "overflow": 1})
        layer_dtype = (F64 if dtype == F32 else F32) if kind in ("other dtype", "overflow") \
            else dtype
        if kind != "shape":
            o, i = self.o, self.i
        elif self.o != self.i:
            o, i = self.i, self.o
        else:
            o, i = self.o, self.i + 1
        r = int(rng.integers(1, min(o, i) + 1))
        alpha = 1e39 * r if kind == "overflow" else pick(rng, [1.0, 4.0, 0.5])
        if kind == "overflow":
            layer_dtype = F64
        layer = LoraLinear(array_values(rng, (o, i), layer_dtype), r, alpha,
                           seed=int(rng.integers(100)))
        layer.lora_b = array_values(rng, (o, r), layer_dtype)
        # (Never merged here: a merge would compile the merge kernels in this group's
        # process too; LoraLinear's states are the float32/float64 groups' business.)
        if rng.random() < 0.2:
            layer.disable()
        value = layer
        expect, names = "correct", ()
        if kind == "shape":
            expect, names = "error", ("layer",)
        elif kind == "not a layer":
            value = pick(rng, [None, self.W, "layer", self.m, layer.weight])
            expect, names = "error", ("layer",)
        elif kind == "name":
            name = pick(rng, ["", None, 3] + self.names()[:1] * 2)
            expect, names = "error", ("name", "adapter")
        elif kind == "overflow" and dtype == F32:
            expect, names = "error", ("alpha", "scaling")
        watch = Watch()
        _watch_multi(watch, self.m)
        if isinstance(value, LoraLinear):
            watch.state("layer", lambda: (value.weight, value.lora_a, value.lora_b,
                                          value.is_merged, value.is_enabled))

        def check(result):
            A1 = np.asarray(layer.lora_a).astype(dtype)
            B1 = np.asarray(layer.lora_b).astype(dtype)
            self.model.append((name, A1, B1, layer.scaling))
            if self.m.adapter_names != self.names():
                raise AssertionError("adapter_names wrong after add_layer")
            if self.m.scaling(name) != layer.scaling or self.m.rank(name) != layer.rank:
                raise AssertionError("add_layer did not take the layer's scaling and rank")

        return Case("MultiLoraLinear.add_layer",
                    f"add_layer {dtype} ({self.o}, {self.i}) {kind}: {name!r}, "
                    f"{type(value).__name__}", lambda: self.m.add_layer(name, value), expect,
                    check, names, watch)

    def remove_adapter(self):
        rng = self.rng
        names = self.names()
        if names and rng.random() < 0.5:
            name, expect = pick(rng, names), "correct"
        else:
            name = pick(rng, ["missing", None, 0, [], b"a", ("a",), -1] + [
                n.upper() + "!" for n in names[:1]])
            expect = "error"
        watch = Watch()
        _watch_multi(watch, self.m)

        def check(result):
            self.model[:] = [entry for entry in self.model if entry[0] != name]
            if self.m.adapter_names != self.names():
                raise AssertionError("adapter_names wrong after remove_adapter")

        return Case("MultiLoraLinear.remove_adapter", f"remove_adapter({name!r}) of {names}",
                    lambda: self.m.remove_adapter(name), expect, check, ("adapter",), watch)

    def lookup(self):
        rng = self.rng
        names = self.names()
        valid = names and rng.random() < 0.5
        name = pick(rng, names) if valid else pick(rng, ["nope", None, [], 0, {"a": 1}, b"a"])
        how = pick(rng, ["scaling", "rank", "in"])
        if how == "in":
            call = (lambda: name in self.m)
        else:
            call = (lambda: getattr(self.m, how)(name))
        model = dict((entry[0], entry) for entry in self.model)

        def check(result):
            if how == "in":
                if result is not bool(valid):
                    raise AssertionError(f"{name!r} in layer gave {result!r}")
            elif how == "scaling" and not math.isclose(result, model[name][3], rel_tol=1e-15):
                raise AssertionError(f"scaling {result!r}, expected {model[name][3]!r}")
            elif how == "rank" and result != len(model[name][1]):
                raise AssertionError(f"rank {result!r}, expected {len(model[name][1])}")

        expect = "correct" if (valid or how == "in") else "error"
        watch = Watch()
        _watch_multi(watch, self.m, always=True)
        return Case(f"MultiLoraLinear.{how}", f"{how}({name!r})", call, expect, check,
                    ("adapter",), watch)

    def _ids(self, b, hostile_rate):
        """(value, expect, resolved int ids or None, description)."""
        rng, n, names = self.rng, len(self.model), self.names()
        ints = rng.integers(-1, n, size=b) if n else np.full(b, -1)
        if rng.random() >= hostile_rate:
            kind = pick(rng, {"list": 3, "names": 3, "mixed": 2, "array": 3, "tuple": 1,
                              "strided": 1, "scalars": 1, "str array": 1})
            resolved = [int(v) for v in ints]
            if kind == "names":
                value = [None if v < 0 else names[v] for v in resolved]
            elif kind == "mixed":
                value = [names[v] if v >= 0 and rng.random() < 0.5 else v for v in resolved]
            elif kind == "array":
                dt = np.dtype(pick(rng, ["i1", "i2", "i4", "i8", ">i8", "u1", "u2", "u4", "u8"]))
                if dt.kind == "u":
                    resolved = [max(v, 0) if n else -1 for v in resolved]
                    if not n:
                        return [-1] * b, "correct", [-1] * b, "ids list"

                value = np.array(resolved).astype(dt)
            elif kind == "tuple":
                value = tuple(resolved)
            elif kind == "strided":
                value = np.repeat(np.array(resolved, np.int64), 2)[::2]
            elif kind == "scalars":
                value = [np.int32(v) for v in resolved]
            elif kind == "str array" and n and b:
                resolved = [max(v, 0) for v in resolved]
                value = np.array([names[v] for v in resolved])
            else:
                value = list(resolved)
            return value, "correct", resolved, f"ids {kind}"
        return self._hostile_ids(b)

    def _hostile_ids(self, b):
        rng, n, names = self.rng, len(self.model), self.names()
        good = [int(v) for v in (rng.integers(-1, n, size=b) if n else np.full(b, -1))]
        kind = pick(rng, ["range", "huge", "uint64", "float", "bool", "complex", "name",
                          "unhashable", "length", "2-D", "scalar", "datetime", "bytes name",
                          "unordered"])
        if kind == "unordered":  # a set or dict: its order is not the rows'
            entries = [None if v < 0 else names[v] for v in good] or ["x"]
            value = pick(rng, [set(entries), frozenset(entries), dict.fromkeys(entries)])
            return value, "error", None, f"ids {type(value).__name__}"
        if kind == "length":
            value = good + [-1] if rng.random() < 0.5 or not good else good[:-1]
            return value, "error", None, f"{len(value)} ids for {b} rows"
        if kind == "2-D":
            return np.array(good, np.int64).reshape(-1, 1), "error", None, "ids 2-D"
        if kind == "scalar":
            value = pick(rng, [0, None, "a", np.int64(0), np.array(0), (x for x in good)])
            return value, "error", None, f"ids {type(value).__name__}"
        if not b:
            return [0] * 1, "error", None, "one id for no rows"
        row = int(rng.integers(b))
        bad = list(good)
        if kind == "range":
            bad[row] = pick(rng, [n, n + 1, -2, -(2 ** 31)])
        elif kind == "huge":
            bad[row] = pick(rng, [2 ** 63 - 1, 2 ** 63, 2 ** 64 + n, 2 ** 70, -(2 ** 70)])
        elif kind == "uint64":
            arr = np.array([max(v, 0) for v in good], np.uint64)
            arr[row] = np.uint64(2 ** 64 - 1)
            return arr, "error", None, "uint64 id 2**64-1"
        elif kind == "float":
            if rng.random() < 0.5:
                return np.array(good, np.float64), "error", None, "float64 id array"
            bad[row] = pick(rng, [0.0, np.float64(0), float("nan")])
        elif kind == "bool":
            if rng.random() < 0.5:
                return np.array(good) >= 0, "error", None, "bool id array"
            bad[row] = pick(rng, [True, False, np.bool_(False)])
        elif kind == "complex":
            return np.array(good, np.complex128), "error", None, "complex id array"
        elif kind == "name":
            bad[row] = pick(rng, ["nope", ""] + [nm + " " for nm in names[:1]])
        elif kind == "unhashable":
            bad[row] = pick(rng, [[0], {"a"}, {}, np.array([0])])
        elif kind == "datetime":
            return np.array(good, "M8[s]"), "error", None, "datetime ids"
        else:
            bad[row] = pick(rng, [b"a"] + [nm.encode() for nm in names[:1]])
        return bad, "error", None, f"ids {kind}: {bad[row]!r} at row {row}"

    def forward_batch(self):
        rng, dtype, o, i = self.rng, self.dtype, self.o, self.i
        b = pick(rng, [0, 1, 2, 3, 5, 8])
        part = pick(rng, {"valid": 8, "X": 2, "ids": 4, "out": 2, "path": 1})
        x = real_input(rng, (b, i), dtype, "X", hostile=(part == "X"), kinds=PASSTHROUGH)
        if part == "X" and isinstance(x.value, np.ndarray) and x.value.dtype.kind == "f" \
                and x.value.ndim == 2 and x.value.shape[1] == i and x.value.shape[0] != b:
            x.expect = "error"  # another batch size than the ids: still refused
        ids, ids_expect, resolved, ids_what = self._ids(
            b, {"valid": 0.2, "ids": 1.0}.get(part, 0.0))
        out = out_input(rng, (b, o), dtype, hostile=(part == "out"))
        path = pick(rng, ["auto", "segmented", "rows"])
        if part == "path":
            path = pick(rng, [None, 1, "AUTO", "", b"auto", ["auto"], "Rows"])
        expect = "error" if (part != "valid" and part != "ids") or ids_expect == "error" else \
            "correct"
        if part == "X":
            expect = x.expect
        names = {"X": ("X", "adapter_ids"), "out": ("out",),
                 "path": ("path",)}.get(part, _ID_NAMES)
        model = list(self.model)
        watch = Watch()
        _watch_multi(watch, self.m, always=True)
        watch_input(watch, "X", x)
        watch.input("adapter_ids", ids)
        watch_out(watch, out)

        def check(result):
            adapters = [(A, B, s) for _, A, B, s in model]
            if out.value is not None and np.asarray(out.value).size and \
                    not np.shares_memory(result, out.value):
                raise AssertionError("did not write into out")
            if np.asarray(result).dtype != dtype:
                raise AssertionError(f"result dtype {np.asarray(result).dtype}")
            exact.check_multi(np.asarray(result), self.W, adapters,
                              np.asarray(x.converted), resolved, dtype)

        return Case("MultiLoraLinear.forward_batch",
                    f"forward_batch {dtype} ({o}, {i}) {len(model)} adapters b={b} {part}: "
                    f"{x.what}; {ids_what}; {out.what}; path {path!r}",
                    lambda: self.m.forward_batch(x.value, ids, out=out.value, path=path),
                    expect, check, names, watch)


def constructor_case(rng):
    dtype = np.dtype(pick(rng, [np.float16, np.float32, np.float64]))
    shape = (int(rng.integers(1, 6)), int(rng.integers(1, 6)))
    inp = real_input(rng, shape, dtype, "weight", hostile=rng.random() < 0.6,
                     kinds={"same": 5, "list": 1, "rows": 1, "fortran": 1, "strided": 1,
                            "readonly": 1})
    v = inp.value
    if inp.expect == "error" and isinstance(v, np.ndarray) and v.dtype.kind == "f" \
            and v.dtype.isnative and v.dtype.itemsize <= 8 and v.ndim == 2 and min(v.shape):
        inp.expect = "correct"  # another shape is just another weight
    layer_dtype = None
    if inp.expect == "correct":
        given = np.asarray(v).dtype
        layer_dtype = F64 if given == F64 else F32
    watch = Watch()
    watch_input(watch, "weight", inp)

    def check(m):
        expected = np.asarray(v).astype(layer_dtype)
        if m.dtype != layer_dtype or not exact.same_bits(m.weight, expected):
            raise AssertionError("weight is not the input converted to float32/float64")
        if m.adapter_names != [] or len(m) != 0:
            raise AssertionError("a new layer must have no adapters")

    return Case("MultiLoraLinear()", f"MultiLoraLinear {inp.what}",
                lambda: MultiLoraLinear(v), inp.expect, check, ("weight",), watch)


def layer_cases(rng):
    """MultiLoraLinear: ~150 constructor cases, ~1100 operations in ~130 sessions."""
    for _ in range(150):
        yield constructor_case(rng)
    for _ in range(130):
        session = Session(rng)
        for _ in range(int(rng.integers(4, 14))):
            op = pick(rng, {"forward_batch": 6, "add_adapter": 3, "add_layer": 1,
                            "remove_adapter": 1, "lookup": 1})
            yield getattr(session, op)()

