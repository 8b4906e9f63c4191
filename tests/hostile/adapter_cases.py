"""Hostile cases for ``LoraConfig``, ``LoraAdapter`` and ``numba_lora.set_num_threads``."""

import dataclasses
import decimal
import fractions
import math
import operator

import numba
import numpy as np

import numba_lora
from numba_lora import LoraAdapter, LoraConfig

from . import exact
from .harness import Case, Watch
from .inputs import PASSTHROUGH, out_input, real_input
from .layer_cases import FLAGS_BAD, kernel_scaling, watch_input, watch_layer, watch_out
from .values import F32, F64, array_values, pick

__all__ = ["api_cases", "session_cases"]


def _gen(*items):
    return (item for item in items)


#: Per field: (valid values, values to refuse).  "gen" stands for a generator.
FIELDS = {
    "rank": ([1, 8, np.int64(3), np.uint8(2), 2 ** 70],
             [0, -1, 1.0, "1", None, True, np.bool_(True), [], 1j, np.float64(2.0)]),
    "alpha": ([1, 0.5, np.float32(2.0), fractions.Fraction(1, 3), 16, np.int8(3), 1e300],
              [0, -0.0, math.inf, math.nan, -1, "1", None, True, 1j, decimal.Decimal(1),
               2 ** 2000]),
    "dropout": ([0, 0.5, 1, np.float64(0.1), fractions.Fraction(1, 2), 0.0],
                [-0.1, 1.1, math.nan, math.inf, "0", None, True, 1j]),
    "target_modules": ([None, "q", ["q", "v"], ("q",), "gen", [], np.str_("q")],
                       [1, b"q", {"q": 1}, ["q", 1], [None], [b"q"], 1.5]),
    "fan_in_fan_out": ([True, False, np.True_], [0, 1, "true", None, "False"]),
    "use_rslora": ([True, False, np.False_], [0, 1, "yes", None, []]),
    "rank_pattern": ([None, {}, {"q": 2}, {r"layers\.0\.q": 4}, {"q|v": np.int64(3)}],
                     [[], "q", {1: 2}, {"(": 2}, {"q": 0}, {"q": "2"}, {"q": True},
                      {"(?i)q": 2}, {"q": 2.0}]),
    "alpha_pattern": ([None, {}, {"q": 2.5}, {"v": np.float32(1.0)}],
                      [[], {"q": 0}, {"q": math.nan}, {"[": 1.0}, {"q": "1"}, {2: 1.0}]),
}


def _convert(field, value):
    """What LoraConfig should store for a valid ``value`` of ``field``."""
    if field == "rank":
        return operator.index(value)
    if field in ("alpha", "dropout"):
        return float(value)
    if field == "target_modules":
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        return tuple(value)
    if field in ("fan_in_fan_out", "use_rslora"):
        return bool(value)
    if value is None:
        return {}
    convert = operator.index if field == "rank_pattern" else float
    return {k: convert(v) for k, v in value.items()}


def _value(v):
    return _gen("q", "v") if isinstance(v, str) and v == "gen" else v


def config_case(rng):
    kwargs = {"rank": pick(rng, [1, 2, 4, 8]), "alpha": pick(rng, [1.0, 8.0, 16])}
    expected = {}
    for field, (good, _bad) in FIELDS.items():
        if field in kwargs or rng.random() < 0.5:
            value = pick(rng, good)
            kwargs[field] = value
    good_kwargs = dict(kwargs)
    hostile = pick(rng, list(FIELDS)) if rng.random() < 0.55 else None
    if hostile:
        kwargs[hostile] = pick(rng, FIELDS[hostile][1])
    for field, value in kwargs.items():
        if field != hostile:
            expected[field] = _convert(field, _gen("q", "v") if value == "gen" else value)
    how = pick(rng, ["init", "validate"])
    watch = Watch()
    if how == "validate":
        # Valid first, then a field set by hand and validate() called: a
        # refusal must leave every field as it was (no half-converted config).
        config = LoraConfig(**{k: _value(v) for k, v in good_kwargs.items()})
        field = hostile or pick(rng, list(FIELDS))
        value = kwargs[field] if hostile else pick(rng, FIELDS[field][0])
        setattr(config, field, _value(value))
        if not hostile:
            expected[field] = _convert(field, _value(value))
        watch.state("config", lambda: tuple(getattr(config, f.name)
                                            for f in dataclasses.fields(config)))
        call = config.validate
    else:
        call = (lambda: LoraConfig(**{k: _value(v) for k, v in kwargs.items()}))

    def check(result):
        got = {f: getattr(result, f) for f in expected}
        for f, want in expected.items():
            have = got[f]
            if type(have) is not type(want) or have != want:
                raise AssertionError(f"{f} is {have!r} ({type(have).__name__}), expected "
                                     f"{want!r} ({type(want).__name__})")

    return Case(f"LoraConfig.{'__init__' if how == 'init' else 'validate'}",
                f"LoraConfig {how} hostile={hostile}: " + ", ".join(
                    f"{k}={v!r}" for k, v in kwargs.items()),
                call, "error" if hostile else "correct", check, (hostile,) if hostile else (),
                watch)


def pattern_lookup_case(rng):
    config = LoraConfig(2, 4.0, rank_pattern=pick(rng, [{}, {"q": 3}]),
                        alpha_pattern=pick(rng, [{}, {"v": 1.5}]))
    name = pick(rng, ["q", "layers.0.q", "v", "x.v", "k", pick(rng, [None, 5, b"q", ["q"]])])
    how = pick(rng, ["rank_for", "alpha_for"])
    valid = isinstance(name, str)

    def check(result):
        want = {"rank_for": (config.rank_pattern.get("q", 2) if name.endswith("q") else 2),
                "alpha_for": (config.alpha_pattern.get("v", 4.0) if name.endswith("v")
                              else 4.0)}[how]
        if result != want:
            raise AssertionError(f"{how}({name!r}) = {result!r}, expected {want!r}")

    return Case(f"LoraConfig.{how}", f"{how}({name!r}) with {config.rank_pattern} "
                f"{config.alpha_pattern}", lambda: getattr(config, how)(name),
                "correct" if valid else "error", check, ("module_name",))


# ------------------------------------------------------------------ adapter
_NAMES_BAD = ["", "a..b", ".a", "a.", "a b", "a\n", "lora_A", "x.lora_B.y", "base_model.model.x",
              "x.lora_embedding_A", "modules_to_save.q", None, 1, b"x", ("q",)]


class AdapterSession:
    def __init__(self, rng, dtype):
        self.rng = rng
        self.config = LoraConfig(
            rank=pick(rng, [1, 2, 3]), alpha=pick(rng, [1.0, 4.0, 16.0]),
            fan_in_fan_out=bool(rng.random() < 0.2), use_rslora=bool(rng.random() < 0.3),
            rank_pattern=pick(rng, [{}, {"q": 1}]), alpha_pattern=pick(rng, [{}, {"v": 2.0}]))
        self.adapter = LoraAdapter(self.config)
        self.dtype = dtype
        self.count = 0
        for _ in range(int(rng.integers(0, 4))):
            self._add_valid()

    def _name(self):
        self.count += 1
        return pick(self.rng, ["layers.{}.q", "model.layers.{}.v", "blk{}.k", "h.{}.attn.q"]) \
            .format(self.count)

    def _shape(self):
        return int(self.rng.integers(3, 7)), int(self.rng.integers(3, 7))

    def _add_valid(self):
        rng = self.rng
        o, i = self._shape()
        W = array_values(rng, (i, o) if self.config.fan_in_fan_out else (o, i), self.dtype)
        layer = self.adapter.add_layer(self._name(), W, seed=int(rng.integers(100)))
        mode = pick(rng, {"normal": 8, "huge": 1, "specials": 1})
        layer.lora_b = array_values(rng, (layer.out_features, layer.rank), self.dtype, mode)
        if rng.random() < 0.3:
            layer.merge()
        if rng.random() < 0.2:
            layer.disable()

    def _watch(self, watch, always=False):
        watch.state("adapter.layer_names", lambda: self.adapter.layer_names, always)
        for name, layer in self.adapter.items():
            watch_layer(watch, layer, prefix=name, always=always)

    def add_layer(self):
        rng, config = self.rng, self.config
        name = self._name()
        o, i = self._shape()
        shape = (i, o) if config.fan_in_fan_out else (o, i)
        weight = real_input(rng, shape, self.dtype, "weight",
                            kinds={"same": 6, "list": 1, "rows": 1, "fortran": 1, "readonly": 1})
        seed = pick(rng, [None, 3, np.random.default_rng(1), [1, 2]])
        part = pick(rng, {"valid": 4, "name": 3, "weight": 2, "seed": 1})
        expect, names = "correct", ()
        if part == "name":
            existing = self.adapter.layer_names
            name = pick(rng, _NAMES_BAD + existing[:1] * 2 + [
                "model." + n for n in existing[:1] if not n.startswith("model.")])
            expect, names = "error", ("name", "layer")
        elif part == "weight":
            weight = real_input(rng, shape, self.dtype, "weight", hostile=True)
            expect, names = "error", ("weight",)
        elif part == "seed":
            seed = pick(rng, [-1, "abc", 2.5, object()])
            expect, names = "error", ("seed",)
        if expect == "error" and part == "weight" and isinstance(weight.value, np.ndarray) \
                and weight.value.dtype.kind == "f" and weight.value.ndim == 2 \
                and min(weight.value.shape) >= config.rank_for(name):
            expect = "correct"  # another shape is another weight
        W_given = None if expect == "error" else np.asarray(weight.value)
        watch = Watch()
        self._watch(watch)
        watch_input(watch, "weight", weight)

        def check(layer):
            if self.adapter[name] is not layer or self.adapter.layer_names[-1] != name:
                raise AssertionError("add_layer did not add the layer under its name")
            want_w = W_given.T if config.fan_in_fan_out else W_given
            dtype = F64 if want_w.dtype == F64 else F32
            if not exact.same_bits(layer.weight, want_w.astype(dtype)):
                raise AssertionError("weight is not the given one (transposed for fan_in_fan_out)")
            want = (config.rank_for(name), config.alpha_for(name), config.use_rslora)
            if (layer.rank, layer.alpha, layer.use_rslora) != want:
                raise AssertionError(f"layer has {(layer.rank, layer.alpha, layer.use_rslora)}, "
                                     f"config gives {want}")

        return Case("LoraAdapter.add_layer", f"add_layer({name!r}) {part}: {weight.what}, "
                    f"seed {seed!r}", lambda: self.adapter.add_layer(name, weight.value,
                                                                      seed=seed),
                    expect, check, names, watch)

    def forward(self):
        rng = self.rng
        names = self.adapter.layer_names
        batch = rng.random() < 0.5
        if names and rng.random() < 0.75:
            name = pick(rng, names)
        else:
            name = pick(rng, ["missing", None, [], 0, "model." + (names[0] if names else "x")])
        layer = self.adapter[name] if name in self.adapter else None
        hostile = rng.random() < 0.3
        expect = "error" if layer is None or hostile else "correct"
        i = layer.in_features if layer else 3
        o = layer.out_features if layer else 3
        shape = (pick(rng, [0, 1, 3]), i) if batch else (i,)
        x = real_input(rng, shape, layer.dtype if layer else F32, "X" if batch else "x",
                       hostile=hostile, kinds=PASSTHROUGH)
        if hostile and layer is not None and isinstance(x.value, np.ndarray) \
                and x.value.dtype.kind == "f" and x.value.ndim == len(shape) \
                and x.value.shape[-1] == i:
            expect, x.converted = "correct", x.value.astype(layer.dtype)
        out = out_input(rng, np.shape(x.converted)[:-1] + (o,) if expect == "correct"
                        else (o,), layer.dtype if layer else F32)
        names_ = ("x", "X") if layer is not None else ("layer", "adapter")
        watch = Watch()
        self._watch(watch, always=True)
        watch_input(watch, "x", x)
        watch_out(watch, out)
        if layer is not None:
            W0, A0, B0 = layer.weight.copy(), layer.lora_a.copy(), layer.lora_b.copy()
            k = kernel_scaling(layer.is_merged, layer.is_enabled, layer.scaling)

        def check(result):
            exact.check_forward(result, W0, A0, B0, k, np.asarray(x.converted), layer.dtype)

        how = "forward_batch_layer" if batch else "forward_layer"
        return Case(f"LoraAdapter.{how}", f"{how}({name!r}) {x.what}; {out.what}",
                    lambda: getattr(self.adapter, how)(name, x.value, out=out.value),
                    expect, check, names_, watch)

    def lookup(self):
        rng = self.rng
        names = self.adapter.layer_names
        name = pick(rng, names) if names and rng.random() < 0.5 else pick(
            rng, ["nope", None, [], {}, 1, b"q"])
        exists = name in names if isinstance(name, str) else False

        def check(result):
            if result is not self.adapter._layers[name]:
                raise AssertionError("adapter[name] is not the layer")

        return Case("LoraAdapter.__getitem__", f"adapter[{name!r}]",
                    lambda: self.adapter[name], "correct" if exists else "error", check,
                    ("layer",))

    def merge_all(self):
        rng = self.rng
        how = pick(rng, ["merge_all", "merge_all", "unmerge_all", "enable_all", "disable_all"])
        check_finite = pick(rng, [True, False, True, False, pick(rng, FLAGS_BAD)])
        layers = list(self.adapter.items())
        before = {name: (layer.weight.copy(), layer.lora_a.copy(), layer.lora_b.copy(),
                         layer.is_merged, layer.is_enabled) for name, layer in layers}
        expected = {}
        bad_flag = how == "merge_all" and not isinstance(check_finite, (bool, np.bool_))
        refused = bad_flag
        for name, layer in layers:
            W, A, B, merged, enabled = before[name]
            if how == "merge_all" and not merged:
                W = exact.exact_update(W, A, B, layer.scaling, 1)
                refused |= bool(check_finite and exact.nonfinite(W))
                merged = True
            elif how == "unmerge_all" and merged:
                W = exact.exact_update(W, A, B, layer.scaling, -1)
                merged = False
            elif how in ("enable_all", "disable_all"):
                enabled = how == "enable_all"
            expected[name] = (W, merged, enabled)
        watch = Watch()
        self._watch(watch)

        def check(result):
            for name, layer in layers:
                W, merged, enabled = expected[name]
                if not exact.same_bits(layer.weight, W) or layer.is_merged != merged \
                        or layer.is_enabled != enabled:
                    raise AssertionError(f"layer {name!r} is not as {how} should leave it")

        call = (lambda: self.adapter.merge_all(check_finite=check_finite)) \
            if how == "merge_all" else getattr(self.adapter, how)
        return Case(f"LoraAdapter.{how}", f"{how} check_finite={check_finite} "
                    f"({len(layers)} layers, refused={refused})", call,
                    "error" if refused else "correct", check,
                    ("check_finite",) if bad_flag else ("merging", "merge") if refused else (),
                    watch)


def adapter_init_case(rng):
    good = rng.random() < 0.4
    if good:
        config = LoraConfig(2, 4.0)
    else:
        config = pick(rng, [None, {"rank": 2, "alpha": 4}, "config", LoraConfig, 2])
        if rng.random() < 0.4:
            config = LoraConfig(2, 4.0)
            setattr(config, pick(rng, ["rank", "alpha", "dropout"]), pick(rng, [-1, "x", None]))

    def check(adapter):
        if len(adapter) != 0 or adapter.config is not config:
            raise AssertionError("a new adapter must be empty and keep its config")

    return Case("LoraAdapter()", f"LoraAdapter({config!r})", lambda: LoraAdapter(config),
                "correct" if good else "error", check, ("config", "rank", "alpha", "dropout"))


# ------------------------------------------------------------------ threads
def threads_cases(rng):
    limit = numba.config.NUMBA_NUM_THREADS
    original = numba.get_num_threads()
    good = [1, limit, np.int64(1), np.uint8(limit)]
    bad = [0, -1, limit + 1, 10 ** 6, 2 ** 70, -(2 ** 70), "2", "1", 2.5, 1.0, None, True,
           False, math.inf, math.nan, 1j, [1], np.float64(1.0), np.bool_(True), b"1"]
    for value in good * 3 + bad:
        numba_lora.set_num_threads(original)  # every case starts from the same count
        valid = any(value is g for g in good)
        watch = Watch()
        watch.state("threads", numba_lora.get_num_threads)

        def check(previous, value=value):
            if previous != original:
                raise AssertionError(f"returned {previous!r}, the previous count was {original}")
            numba_threads, blas = numba_lora.get_num_threads()
            if numba_threads != int(value) or blas not in (None, int(value)):
                raise AssertionError(f"threads are {(numba_threads, blas)} after "
                                     f"set_num_threads({value!r})")

        yield Case("set_num_threads", f"set_num_threads({value!r})",
                   lambda value=value: numba_lora.set_num_threads(value),
                   "correct" if valid else "error", check, ("n",), watch)
    numba_lora.set_num_threads(original)


def api_cases(rng):
    """LoraConfig (~450), LoraAdapter() (~40), set_num_threads (~30): no kernel runs."""
    for _ in range(400):
        yield config_case(rng)
    for _ in range(50):
        yield pattern_lookup_case(rng)
    for _ in range(40):
        yield adapter_init_case(rng)
    yield from threads_cases(rng)


def session_cases(rng, dtype, n_sessions=35):
    """LoraAdapter sessions over ``dtype`` weights: add_layer, forwards, merge_all, ..."""
    for _ in range(n_sessions):
        session = AdapterSession(rng, dtype)
        for _ in range(int(rng.integers(4, 12))):
            op = pick(rng, {"add_layer": 3, "forward": 3, "lookup": 1, "merge_all": 2})
            yield getattr(session, op)()
