"""One error contract: everything numba_lora raises is a LoraError with the right built-in base.

Two halves: a table of bad inputs fed to each public entry point of the
adapter, config, multi-adapter and file-format modules (checking the class,
the built-in base, and that the refused call changed nothing), and a walk
over every ``raise`` statement in the package's Python modules.
"""

import ast
import builtins
import importlib
import inspect
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import save_file

import numba_lora
from numba_lora import (
    LoraAdapter,
    LoraConfig,
    LoraConfigError,
    LoraDtypeError,
    LoraError,
    LoraFormatError,
    LoraKeyError,
    LoraLinear,
    LoraShapeError,
    LoraTypeError,
    MultiLoraLinear,
)
from numba_lora.io.safetensors import read_safetensors

RAGGED = [[1.0, 2.0], [3.0]]
COMPLEX = np.ones((5, 6), complex)
STRINGS = np.full((5, 6), "a")
OBJECTS = np.array([[1.0, None]] * 5, dtype=object)


@pytest.fixture
def world(tmp_path):
    rng = np.random.default_rng(0)
    adapter = LoraAdapter(LoraConfig(r=2, lora_alpha=4))
    for name in ("layers.0.q", "layers.0.v"):
        layer = adapter.add_layer(name, rng.standard_normal((5, 6)), seed=1)
        layer.lora_b = rng.standard_normal((5, 2))
    adapter["layers.0.v"].merge()
    multi = MultiLoraLinear(rng.standard_normal((5, 6)))
    multi.add_adapter("a", rng.standard_normal((2, 6)), rng.standard_normal((5, 2)), alpha=2.0)
    multi.add_adapter("b", rng.standard_normal((3, 6)), rng.standard_normal((5, 3)), alpha=1.0)
    good = tmp_path / "good"
    adapter.save_peft(good)
    base = {f"{n}.weight": layer.weight.copy() for n, layer in adapter.items()}
    return SimpleNamespace(adapter=adapter, multi=multi, good=good, base=base, tmp=tmp_path)


def fingerprint(w):
    """Everything a refused call must leave as it was, as bytes and names."""
    layers = tuple(
        (name, layer.is_merged, layer.is_enabled, layer.weight.tobytes(), layer.lora_a.tobytes(),
         layer.lora_b.tobytes())
        for name, layer in w.adapter.items()
    )
    packed = w.multi._packed
    multi = (tuple(w.multi.adapter_names), w.multi.weight.tobytes(), packed.A_cat.tobytes(),
             packed.BT_cat.tobytes(), packed.scalings.tobytes(), packed.offsets.tobytes())
    files = tuple((p.name, p.read_bytes()) for p in sorted(w.good.iterdir()))
    return layers, multi, repr(w.adapter.config), files


def broken_copy(w, *, config=None, raw_config=None, tensors=None, raw_tensors=None):
    """A copy of the good adapter directory with one file replaced."""
    path = w.tmp / "broken"
    shutil.copytree(w.good, path)
    if config is not None:
        saved = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps(saved | config))
    if raw_config is not None:
        (path / "adapter_config.json").write_bytes(raw_config)
    if tensors is not None:
        save_file(tensors, str(path / "adapter_model.safetensors"))
    if raw_tensors is not None:
        (path / "adapter_model.safetensors").write_bytes(raw_tensors)
    return path


def truncated(w):
    blob = (w.good / "adapter_model.safetensors").read_bytes()
    return broken_copy(w, raw_tensors=blob[:-5])


def long_header(w):
    blob = (w.good / "adapter_model.safetensors").read_bytes()
    return broken_copy(w, raw_tensors=(len(blob) * 2).to_bytes(8, "little") + blob[8:])


A = "base_model.model.layers.0.q.lora_A.weight"
B = "base_model.model.layers.0.q.lora_B.weight"

# (id, call, LoraError subclass, built-in base)
CASES = [
    # ---- LoraConfig
    ("config-rank-list", lambda w: LoraConfig(r=[2], lora_alpha=1), LoraConfigError, ValueError),
    ("config-rank-pattern-list", lambda w: LoraConfig(r=2, lora_alpha=1, rank_pattern=[("q", 1)]),
     LoraConfigError, ValueError),
    ("config-rank-pattern-str", lambda w: LoraConfig(r=2, lora_alpha=1, rank_pattern="q"),
     LoraConfigError, ValueError),
    ("config-alpha-pattern-nested", lambda w: LoraConfig(r=2, lora_alpha=1, alpha_pattern={"q": {}}),
     LoraConfigError, ValueError),
    ("config-targets-int", lambda w: LoraConfig(r=2, lora_alpha=1, target_modules=3),
     LoraConfigError, ValueError),
    ("config-targets-non-str", lambda w: LoraConfig(r=2, lora_alpha=1, target_modules=["q", None]),
     LoraConfigError, ValueError),
    ("config-validate-mutated", lambda w: _mutated_config().validate(), LoraConfigError, ValueError),
    # ---- LoraAdapter
    ("adapter-config-type", lambda w: LoraAdapter({"rank": 2}), LoraTypeError, TypeError),
    ("add-layer-ragged", lambda w: w.adapter.add_layer("x", RAGGED), LoraDtypeError, ValueError),
    ("add-layer-complex", lambda w: w.adapter.add_layer("x", COMPLEX), LoraDtypeError, ValueError),
    ("add-layer-strings", lambda w: w.adapter.add_layer("x", STRINGS), LoraDtypeError, ValueError),
    ("add-layer-objects", lambda w: w.adapter.add_layer("x", OBJECTS), LoraDtypeError, ValueError),
    ("add-layer-none", lambda w: w.adapter.add_layer("x", None), LoraDtypeError, ValueError),
    ("add-layer-int-weight", lambda w: w.adapter.add_layer("x", np.ones((5, 6), int)),
     LoraDtypeError, ValueError),
    ("add-layer-1d", lambda w: w.adapter.add_layer("x", np.ones(6)), LoraShapeError, ValueError),
    ("add-layer-name-type", lambda w: w.adapter.add_layer(7, np.ones((5, 6))), LoraTypeError, TypeError),
    ("add-layer-name-list", lambda w: w.adapter.add_layer(["x"], np.ones((5, 6))), LoraTypeError,
     TypeError),
    ("add-layer-name-lora-a", lambda w: w.adapter.add_layer("x.lora_A.y", np.ones((5, 6))),
     LoraConfigError, ValueError),
    ("add-layer-name-dots", lambda w: w.adapter.add_layer("x..y", np.ones((5, 6))),
     LoraConfigError, ValueError),
    ("add-layer-name-space", lambda w: w.adapter.add_layer("x y", np.ones((5, 6))),
     LoraConfigError, ValueError),
    ("add-layer-name-prefix", lambda w: w.adapter.add_layer("base_model.model.x", np.ones((5, 6))),
     LoraConfigError, ValueError),
    ("add-layer-name-alias", lambda w: w.adapter.add_layer("model.layers.0.q", np.ones((5, 6))),
     LoraConfigError, ValueError),
    ("add-layer-name-taken", lambda w: w.adapter.add_layer("layers.0.q", np.ones((5, 6))),
     LoraConfigError, ValueError),
    ("add-layer-seed", lambda w: w.adapter.add_layer("x", np.ones((5, 6)), seed="s"), LoraTypeError,
     TypeError),
    ("getitem-unhashable", lambda w: w.adapter[["layers.0.q"]], LoraKeyError, KeyError),
    ("getitem-missing", lambda w: w.adapter["nope"], LoraKeyError, KeyError),
    ("forward-layer-ragged", lambda w: w.adapter.forward_layer("layers.0.q", [1.0, [2.0]]),
     LoraDtypeError, ValueError),
    ("forward-batch-layer-complex",
     lambda w: w.adapter.forward_batch_layer("layers.0.q", np.ones((2, 6), complex)),
     LoraDtypeError, ValueError),
    ("forward-layer-out-list", lambda w: w.adapter.forward_layer("layers.0.q", np.ones(6), out=[0.0]),
     LoraTypeError, TypeError),
    ("save-path-none", lambda w: w.adapter.save_peft(None), LoraTypeError, TypeError),
    ("save-path-file", lambda w: w.adapter.save_peft(w.good / "adapter_config.json"),
     LoraConfigError, ValueError),
    ("save-path-nul", lambda w: w.adapter.save_peft(str(w.tmp / "a\x00b")), LoraConfigError,
     ValueError),
    ("from-peft-path-nul", lambda w: LoraAdapter.from_peft("a\x00b", w.base), LoraConfigError,
     ValueError),
    ("save-empty", lambda w: LoraAdapter(LoraConfig(r=1, lora_alpha=1)).save_peft(w.tmp / "e"),
     LoraFormatError, ValueError),
    # ---- from_peft: base weights
    ("base-list", lambda w: LoraAdapter.from_peft(w.good, list(w.base.values())), LoraTypeError,
     TypeError),
    ("base-int", lambda w: LoraAdapter.from_peft(w.good, 3), LoraTypeError, TypeError),
    ("base-directory", lambda w: LoraAdapter.from_peft(w.good, w.tmp), LoraFormatError, ValueError),
    ("base-missing-file", lambda w: LoraAdapter.from_peft(w.good, w.tmp / "x.safetensors"),
     LoraFormatError, ValueError),
    ("base-random-bytes", lambda w: (w.tmp / "r.safetensors").write_bytes(bytes(range(256)) * 3)
     and LoraAdapter.from_peft(w.good, w.tmp / "r.safetensors"), LoraFormatError, ValueError),
    ("base-int-dtype", lambda w: LoraAdapter.from_peft(
        w.good, {k: np.ones(v.shape, np.int64) for k, v in w.base.items()}), LoraDtypeError, ValueError),
    ("base-ragged", lambda w: LoraAdapter.from_peft(w.good, {k: RAGGED for k in w.base}),
     LoraDtypeError, ValueError),
    ("base-two-for-one", lambda w: LoraAdapter.from_peft(
        w.good, w.base | {f"model.{k}": v for k, v in w.base.items()}), LoraFormatError, ValueError),
    ("base-missing-module", lambda w: LoraAdapter.from_peft(w.good, {}), LoraKeyError, KeyError),
    ("from-peft-path-int", lambda w: LoraAdapter.from_peft(5, w.base), LoraTypeError, TypeError),
    # ---- from_peft: adapter_config.json
    ("json-not-utf8", lambda w: LoraAdapter.from_peft(broken_copy(w, raw_config=b"\xff\xfe"), w.base),
     LoraFormatError, ValueError),
    ("json-invalid", lambda w: LoraAdapter.from_peft(broken_copy(w, raw_config=b"{"), w.base),
     LoraFormatError, ValueError),
    ("json-r-string", lambda w: LoraAdapter.from_peft(broken_copy(w, config={"r": "2"}), w.base),
     LoraFormatError, ValueError),
    ("json-alpha-list", lambda w: LoraAdapter.from_peft(broken_copy(w, config={"lora_alpha": [4]}),
                                                        w.base), LoraFormatError, ValueError),
    ("json-rank-pattern-list", lambda w: LoraAdapter.from_peft(
        broken_copy(w, config={"rank_pattern": [1]}), w.base), LoraFormatError, ValueError),
    ("json-alpha-pattern-nested", lambda w: LoraAdapter.from_peft(
        broken_copy(w, config={"alpha_pattern": {"q": {"a": 1}}}), w.base), LoraFormatError, ValueError),
    ("json-targets-int", lambda w: LoraAdapter.from_peft(
        broken_copy(w, config={"target_modules": 4}), w.base), LoraFormatError, ValueError),
    ("json-targets-non-str", lambda w: LoraAdapter.from_peft(
        broken_copy(w, config={"target_modules": [1, 2]}), w.base), LoraFormatError, ValueError),
    # ---- from_peft: adapter_model.safetensors
    ("st-random-bytes", lambda w: LoraAdapter.from_peft(
        broken_copy(w, raw_tensors=bytes(np.random.default_rng(3).integers(0, 256, 99, np.uint8))),
        w.base), LoraFormatError, ValueError),
    ("st-header-past-end", lambda w: LoraAdapter.from_peft(long_header(w), w.base), LoraFormatError,
     ValueError),
    ("st-header-not-json", lambda w: LoraAdapter.from_peft(
        broken_copy(w, raw_tensors=(4).to_bytes(8, "little") + b"{{{{"), w.base), LoraFormatError,
     ValueError),
    ("st-truncated", lambda w: LoraAdapter.from_peft(truncated(w), w.base), LoraFormatError, ValueError),
    ("st-int-factors", lambda w: LoraAdapter.from_peft(broken_copy(
        w, tensors={A: np.ones((2, 6), np.int32), B: np.ones((5, 2), np.int32)}), w.base),
     LoraFormatError, ValueError),
    ("st-duplicate-module", lambda w: LoraAdapter.from_peft(broken_copy(
        w, tensors={A: np.ones((2, 6), np.float32), B: np.ones((5, 2), np.float32),
                    "layers.0.q.lora_B.weight": np.ones((5, 2), np.float32)}), w.base),
     LoraFormatError, ValueError),
    ("read-safetensors-dir", lambda w: read_safetensors(w.tmp), LoraFormatError, ValueError),
    ("read-safetensors-list", lambda w: read_safetensors([w.tmp]), LoraTypeError, TypeError),
    # ---- MultiLoraLinear
    ("multi-weight-ragged", lambda w: MultiLoraLinear(RAGGED), LoraDtypeError, ValueError),
    ("multi-weight-complex", lambda w: MultiLoraLinear(COMPLEX), LoraDtypeError, ValueError),
    ("multi-weight-strings", lambda w: MultiLoraLinear(STRINGS), LoraDtypeError, ValueError),
    ("multi-add-ragged", lambda w: w.multi.add_adapter("c", RAGGED, np.ones((5, 2)), 1.0),
     LoraDtypeError, ValueError),
    ("multi-add-objects", lambda w: w.multi.add_adapter("c", np.ones((2, 6)), OBJECTS[:, :1], 1.0),
     LoraDtypeError, ValueError),
    ("multi-add-name-type", lambda w: w.multi.add_adapter(1, np.ones((2, 6)), np.ones((5, 2)), 1.0),
     LoraTypeError, TypeError),
    ("multi-add-taken", lambda w: w.multi.add_adapter("a", np.ones((2, 6)), np.ones((5, 2)), 1.0),
     LoraConfigError, ValueError),
    ("multi-add-layer-type", lambda w: w.multi.add_layer("c", np.ones((5, 6))), LoraTypeError, TypeError),
    ("multi-add-layer-shape", lambda w: w.multi.add_layer("c", LoraLinear(np.ones((4, 6)), 1, 1.0)),
     LoraShapeError, ValueError),
    ("multi-remove-unhashable", lambda w: w.multi.remove_adapter({}), LoraKeyError, KeyError),
    ("multi-remove-missing", lambda w: w.multi.remove_adapter("zz"), LoraKeyError, KeyError),
    ("multi-scaling-unhashable", lambda w: w.multi.scaling(["a"]), LoraKeyError, KeyError),
    ("ids-2**63", lambda w: w.multi.forward_batch(np.ones((2, 6)), [0, 2**63]), LoraKeyError, KeyError),
    ("ids-below-int64", lambda w: w.multi.forward_batch(np.ones((2, 6)), [0, -2**63 - 1]),
     LoraKeyError, KeyError),
    ("ids-uint64-max", lambda w: w.multi.forward_batch(np.ones((2, 6)), np.array([0, 2**64 - 1],
                                                                                 np.uint64)),
     LoraKeyError, KeyError),
    ("ids-float-array", lambda w: w.multi.forward_batch(np.ones((2, 6)), np.array([0.0, 1.0])),
     LoraTypeError, TypeError),
    ("ids-bool-entry", lambda w: w.multi.forward_batch(np.ones((2, 6)), [0, True]), LoraTypeError,
     TypeError),
    ("ids-list-name", lambda w: w.multi.forward_batch(np.ones((2, 6)), [["a"], None]), LoraTypeError,
     TypeError),
    ("ids-unknown-name", lambda w: w.multi.forward_batch(np.ones((2, 6)), ["zz", None]), LoraKeyError,
     KeyError),
    ("ids-count", lambda w: w.multi.forward_batch(np.ones((2, 6)), [0]), LoraShapeError, ValueError),
    ("ids-str", lambda w: w.multi.forward_batch(np.ones((2, 6)), "ab"), LoraTypeError, TypeError),
    ("multi-X-ragged", lambda w: w.multi.forward_batch(RAGGED, [0, 1]), LoraDtypeError, ValueError),
    ("multi-X-complex", lambda w: w.multi.forward_batch(np.ones((2, 6), complex), [0, 1]),
     LoraDtypeError, ValueError),
    ("multi-path-unknown", lambda w: w.multi.forward_batch(np.ones((2, 6)), [0, 1], path="x"),
     LoraConfigError, ValueError),
    ("multi-path-type", lambda w: w.multi.forward_batch(np.ones((2, 6)), [0, 1], path=["rows"]),
     LoraTypeError, TypeError),
    ("multi-out-readonly", lambda w: w.multi.forward_batch(np.ones((2, 6)), [0, 1],
                                                           out=_readonly((2, 5))),
     LoraShapeError, ValueError),
    ("multi-out-overlap", lambda w: w.multi.forward_batch(*_aliased()), LoraShapeError, ValueError),
]


def _readonly(shape):
    out = np.empty(shape)
    out.flags.writeable = False
    return out


def _aliased():
    buffer = np.ones(12)
    return buffer[:12].reshape(2, 6), [0, 1], buffer[:10].reshape(2, 5)


def _mutated_config():
    config = LoraConfig(r=2, lora_alpha=1)
    config.rank_pattern = 5
    return config


@pytest.mark.parametrize("call, error, builtin", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_entry_points_raise_lora_errors_and_change_nothing(world, call, error, builtin):
    before = fingerprint(world)
    with pytest.raises(Exception) as info:
        call(world)
    err = info.value
    assert isinstance(err, LoraError), f"{type(err).__module__}.{type(err).__name__}: {err}"
    assert isinstance(err, error) and isinstance(err, builtin), type(err).__mro__
    assert str(err), "the message must say what went wrong"
    assert fingerprint(world) == before


# ------------------------------------------------------ every raise statement
PACKAGE = Path(numba_lora.__file__).resolve().parent


def _modules():
    """The modules whose raises must all be LoraErrors.

    Left out: numba_lora/kernels/ (its raises run inside @njit code, where
    Numba allows only built-in exception classes) and the benchmark code.
    """
    paths = sorted(PACKAGE.glob("*.py")) + sorted((PACKAGE / "io").glob("*.py"))
    return [p for p in paths if not p.name.startswith("bench")]


def _module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(node, module, tree):
    """The object a raise names: ``X(...)``, ``X``, ``self.method(...)`` or ``Class.method(...)``."""
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Name):
        return getattr(module, node.id, getattr(builtins, node.id, None))
    if isinstance(node, ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            # A method that builds the exception: find it on the module's classes.
            for cls in vars(module).values():
                if inspect.isclass(cls) and cls.__module__ == module.__name__ \
                        and node.attr in vars(cls):
                    found = vars(cls)[node.attr]
                    return getattr(found, "__func__", found)
        base = _resolve(node.value, module, tree)
        return getattr(base, node.attr, None)
    return None


def _raised_classes(obj, module):
    """Exception classes ``obj`` stands for: itself, or what a factory function returns."""
    if inspect.isclass(obj):
        return [obj]
    if inspect.isfunction(obj):
        source = inspect.cleandoc("\n" + inspect.getsource(obj))
        tree = ast.parse(source)
        returned = [n.value for n in ast.walk(tree) if isinstance(n, ast.Return) and n.value]
        classes = [_resolve(r, importlib.import_module(obj.__module__), tree) for r in returned]
        if returned and all(inspect.isclass(c) for c in classes):
            return classes
    return []


def test_every_raise_in_the_package_is_a_lora_error():
    offenders = []
    checked = 0
    for path in _modules():
        module = importlib.import_module(_module_name(path))
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Raise) or node.exc is None:  # bare re-raise
                continue
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
            classes = _raised_classes(_resolve(node.exc, module, tree), module)
            if not classes:
                offenders.append(f"{where}: cannot tell what `raise {ast.unparse(node.exc)[:60]}` raises")
                continue
            for cls in classes:
                checked += 1
                if not issubclass(cls, LoraError):
                    offenders.append(f"{where}: raises {cls.__name__}, not a LoraError")
    assert checked > 50  # the walk found the raises
    assert not offenders, "\n".join(offenders)


def test_the_walk_sees_through_factories():
    # The two factory methods in the package resolve to their classes.
    from numba_lora.io import safetensors
    from numba_lora import multi

    assert _raised_classes(safetensors.SafetensorsFile._error, safetensors) == [LoraFormatError]
    assert _raised_classes(multi.MultiLoraLinear._out_of_range, multi) == [LoraKeyError]
