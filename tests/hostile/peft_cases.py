"""Hostile cases for PEFT files: ``LoraAdapter.from_peft`` on corrupt directories, ``save_peft``.

A few valid adapters are saved once per run (float32 and float64, with and
without ``fan_in_fan_out``, rsLoRA and rank/alpha patterns); each case copies
one into its own directory and corrupts it: random or truncated bytes in
``adapter_config.json`` or ``adapter_model.safetensors``, a changed config
entry, a changed header entry (dtype, shape, offsets, tensor name), flipped
bytes in the header or the data, a hostile ``path`` or ``base_weights``.  A
corruption that leaves a loadable adapter must load exactly what the files
say (read here with ``json`` and ``np.frombuffer``, independently of
numba_lora's reader); every other one must be a LoraError, with the files
untouched.  ``save_peft`` into hostile paths must refuse with the directory
as it was, and a successful save must load back bit for bit.
"""

import json
import os
import pathlib
import re
import shutil
import tempfile

import numpy as np
from safetensors.numpy import save_file

from numba_lora import LoraAdapter, LoraConfig

from . import exact
from .harness import Case, Watch
from .values import F32, F64, array_values, pick

__all__ = ["peft_cases", "read_independently"]

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_DTYPES = {"F32": "<f4", "F64": "<f8", "F16": "<f2"}


def tree_state(root):
    """{relative path: bytes} of every file under ``root`` (a directory listing with contents)."""
    root = pathlib.Path(root)
    if not root.exists():
        return None
    if root.is_file():
        return root.read_bytes()
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def read_independently(path):
    """{name: array} of a safetensors file, exactly as its header says (no validation beyond it)."""
    raw = pathlib.Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    data = raw[8 + n:]
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, stop = info["data_offsets"]
        if info["dtype"] == "BF16":
            bits = np.frombuffer(data[start:stop], "<u2").astype(np.uint32) << 16
            out[key] = bits.view(np.float32).reshape(info["shape"])
        else:
            out[key] = np.frombuffer(data[start:stop], _DTYPES[info["dtype"]]).reshape(
                info["shape"]).astype(_DTYPES[info["dtype"]][1:])
    return out


def _pattern(patterns, name, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


class Template:
    """A valid adapter directory, its base weights, and what loading it must give."""

    def __init__(self, root, rng, k):
        self.dtype = pick(rng, [F32, F64])
        self.fan_in_fan_out = bool(rng.random() < 0.3)
        self.config = LoraConfig(rank=2, alpha=pick(rng, [4.0, 16.0]),
                                 fan_in_fan_out=self.fan_in_fan_out,
                                 use_rslora=bool(rng.random() < 0.3),
                                 rank_pattern=pick(rng, [{}, {"q": 1}]),
                                 alpha_pattern=pick(rng, [{}, {"v": 2.0}]))
        adapter = LoraAdapter(self.config)
        self.base = {}
        for name, (o, i) in (("layers.0.self_attn.q", (5, 6)), ("layers.0.self_attn.v", (4, 6)),
                             ("layers.1.mlp.up", (7, 3))):
            W = array_values(rng, (o, i), self.dtype, "normal")
            stored = W.T.copy() if self.fan_in_fan_out else W
            layer = adapter.add_layer(name, stored, seed=k)
            layer.lora_b = array_values(rng, (o, layer.rank), self.dtype, "normal")
            self.base[f"model.{name}.weight"] = stored
        self.dir = pathlib.Path(root) / f"template{k}"
        adapter.save_peft(self.dir)
        self.base_file = pathlib.Path(root) / f"base{k}.safetensors"
        save_file({key: np.ascontiguousarray(v) for key, v in self.base.items()},
                  str(self.base_file))
        self.config_text = (self.dir / CONFIG).read_text()
        self.weights_bytes = (self.dir / WEIGHTS).read_bytes()

    def copy(self, where):
        shutil.copytree(self.dir, where)
        return pathlib.Path(where)


def check_loaded(adapter, directory, base, fan_in_fan_out=None):
    """``adapter`` holds exactly what ``directory`` and ``base`` say."""
    cfg = json.loads((pathlib.Path(directory) / CONFIG).read_bytes().decode("utf-8-sig"))
    tensors = read_independently(pathlib.Path(directory) / WEIGHTS)
    fifo = bool(cfg.get("fan_in_fan_out") or False) if fan_in_fan_out is None else fan_in_fan_out
    modules = sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in tensors})
    if sorted(adapter.layer_names) != modules:
        raise AssertionError(f"layers {adapter.layer_names}, the file has {modules}")
    for module in modules:
        layer = adapter[module]
        W = np.asarray(base[f"model.{module}.weight"])
        W = W.T if fifo else W
        dtype = F64 if W.dtype == F64 else F32
        A = tensors[f"{PREFIX}{module}.lora_A.weight"]
        B = tensors[f"{PREFIX}{module}.lora_B.weight"]
        if not exact.same_bits(layer.weight, W.astype(dtype)):
            raise AssertionError(f"{module}: weight is not the base weight")
        if not (exact.same_bits(layer.lora_a, A.astype(dtype))
                and exact.same_bits(layer.lora_b, B.astype(dtype))):
            raise AssertionError(f"{module}: lora_a/lora_b are not the file's tensors")
        alpha = float(_pattern(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"]))
        rslora = bool(cfg.get("use_rslora") or False)
        if (layer.rank, layer.alpha, layer.use_rslora) != (A.shape[0], alpha, rslora):
            raise AssertionError(f"{module}: (rank, alpha, use_rslora) = "
                                 f"{(layer.rank, layer.alpha, layer.use_rslora)}, the files say "
                                 f"{(A.shape[0], alpha, rslora)}")
        if layer.is_merged or not layer.is_enabled:
            raise AssertionError(f"{module}: a loaded layer must be unmerged and enabled")


# ------------------------------------------------------------ corruptions
#: (key, new value or DELETE, expect) for adapter_config.json.
DELETE = object()
CONFIG_EDITS = [
    ("r", -1, "error"), ("r", 0, "error"), ("r", "2", "error"), ("r", None, "error"),
    ("r", 2.5, "error"), ("r", 3, "error"), ("r", 2 ** 70, "error"), ("r", True, "error"),
    ("r", [2], "error"), ("r", DELETE, "error"), ("r", float("inf"), "error"),
    ("lora_alpha", 0, "error"), ("lora_alpha", -1, "error"), ("lora_alpha", "4", "error"),
    ("lora_alpha", None, "error"), ("lora_alpha", float("nan"), "error"),
    ("lora_alpha", float("inf"), "error"), ("lora_alpha", True, "error"),
    ("lora_alpha", 8, "correct"), ("lora_alpha", DELETE, "error"),
    ("target_modules", 5, "error"), ("target_modules", {"a": 1}, "error"),
    ("target_modules", ["q", 5], "error"), ("target_modules", None, "correct"),
    ("target_modules", "q", "correct"), ("target_modules", DELETE, "correct"),
    ("use_dora", True, "error"), ("use_dora", False, "correct"), ("lora_bias", True, "error"),
    ("bias", "all", "error"), ("bias", "none", "correct"), ("modules_to_save", ["x"], "error"),
    ("peft_type", "IA3", "error"), ("peft_type", "lora", "correct"),
    ("layer_replication", [[0, 1]], "error"), ("trainable_token_indices", [1], "error"),
    ("fan_in_fan_out", "yes", "error"), ("fan_in_fan_out", 1, "error"),
    ("use_rslora", "no", "error"), ("use_rslora", None, "correct"),
    ("rank_pattern", {"(": 2}, "error"), ("rank_pattern", {"q": 0}, "error"),
    ("rank_pattern", [], "error"), ("rank_pattern", lambda old: {**old, "zzz": 5}, "correct"),
    ("alpha_pattern", {"v": "x"}, "error"), ("alpha_pattern", {"[": 2.0}, "error"),
    ("lora_dropout", 2, "error"), ("lora_dropout", "x", "error"), ("lora_dropout", 0.3, "correct"),
    ("unknown_key", 1, "correct"), ("task_type", "CAUSAL_LM", "correct"),
    ("init_lora_weights", "gaussian", "correct"), ("inference_mode", "maybe", "correct"),
]


def _edit_header(raw, edit):
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    header = edit(header) or header
    text = header if isinstance(header, (bytes, str)) else json.dumps(header)
    blob = text.encode() if isinstance(text, str) else text
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob + data


def _tensor_keys(raw):
    n = int.from_bytes(raw[:8], "little")
    return [k for k in json.loads(raw[8:8 + n]) if k != "__metadata__"]


def _random_bytes(rng, size):
    return rng.integers(0, 256, size).astype(np.uint8).tobytes()


def weights_corruption(rng, raw):
    """(new bytes, expect, description) for adapter_model.safetensors."""
    keys = _tensor_keys(raw)
    key = pick(rng, keys)
    n = int.from_bytes(raw[:8], "little")
    kind = pick(rng, {"random": 2, "truncate": 3, "length": 2, "dtype": 2, "shape": 2,
                      "offsets": 2, "name": 2, "not object": 1, "duplicate": 1, "drop": 1,
                      "extra tensor": 1, "3-D": 1, "header flip": 3, "data flip": 4})
    if kind == "random":
        size = int(rng.integers(0, 400))
        return _random_bytes(rng, size), "error", f"{size} random bytes"
    if kind == "truncate":
        k = int(rng.integers(0, len(raw)))
        return raw[:k], "error", f"truncated to {k} of {len(raw)} bytes"
    if kind == "length":
        value = pick(rng, [0, 1, 7, n + 8, n + 64, len(raw), 2 ** 40, 2 ** 63, 2 ** 64 - 1])
        return value.to_bytes(8, "little") + raw[8:], "error", f"header length {value}"
    if kind == "dtype":
        bad = pick(rng, ["F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "XYZ", "F8_E4M3", 5,
                         None])
        if bad == ("F64" if raw.find(b'"F64"') >= 0 else "F32"):
            bad = "I32" if bad == "F32" else "I64"
        return _edit_header(raw, lambda h: h[key].__setitem__("dtype", bad)), "error", \
            f"{key} dtype {bad!r}"
    if kind == "shape":
        def edit(h):
            shape = h[key]["shape"]
            h[key]["shape"] = pick(rng, [shape[::-1] if shape[0] != shape[1] else [shape[0] * 2,
                                                                                  shape[1] // 2],
                                         [-shape[0], -shape[1]], [shape[0] + 0.5, shape[1]],
                                         [], [shape[0] * shape[1]], [shape[0], shape[1], 1],
                                         "x", [True, shape[1]]])
        new = _edit_header(raw, edit)
        return new, "error", f"{key} shape changed"
    if kind == "offsets":
        def edit(h):
            start, stop = h[key]["data_offsets"]
            h[key]["data_offsets"] = pick(rng, [[stop, start], [start, stop + 4],
                                                [start, 2 ** 62], [-4, stop], ["a", stop],
                                                [start], [start, stop, 0], None])
        return _edit_header(raw, edit), "error", f"{key} data_offsets changed"
    if kind == "name":
        options = [key.replace(".lora_A.", ".lora_C."),
                   key.replace(".weight", ".bias") if ".lora_B." in key else
                   key.replace("lora_A", "lora_embedding_A"),
                   key.replace("self_attn", "self attn"), key.replace(".lora_", "..lora_"),
                   key.replace("weight", "weights"), key.replace(PREFIX, PREFIX + "lora_A.")]
        new_name = pick(rng, [k for k in options if k != key])
        return _edit_header(raw, lambda h: {(new_name if k == key else k): v
                                            for k, v in h.items()}), "error", \
            f"{key} renamed {new_name}"
    if kind == "not object":
        bad = pick(rng, ["[]", "5", '"x"', "null", "[1, 2]"])
        return _edit_header(raw, lambda h: bad), "error", f"header {bad}"
    if kind == "duplicate":
        def edit(h):
            text = json.dumps(h)
            entry = json.dumps(h[key])
            return text[:-1] + f", {json.dumps(key)}: {entry}" + "}"
        return _edit_header(raw, edit), "error", f"{key} twice in the header"
    if kind == "drop":
        return _edit_header(raw, lambda h: {k: v for k, v in h.items() if k != key}), "error", \
            f"{key} dropped"
    if kind == "extra tensor":
        module = key[len(PREFIX):].rsplit(".lora_", 1)[0]
        extra = pick(rng, [f"{PREFIX}{module}.lora_magnitude_vector",
                           f"{PREFIX}{module}.lora_embedding_A",
                           f"{PREFIX}{module}.lora_A.bias", f"{PREFIX}modules_to_save.x.weight",
                           f"{PREFIX}{module}.something.weight"])

        def edit(h):
            h[extra] = dict(h[key])
        return _edit_header(raw, edit), "error", f"extra tensor {extra}"
    if kind == "3-D":
        def edit(h):
            h[key]["shape"] = h[key]["shape"] + [1]
        return _edit_header(raw, edit), "error", f"{key} 3-D"
    if kind == "header flip":
        pos = int(rng.integers(8, 8 + n))
        new = bytearray(raw)
        new[pos] = int(rng.integers(0, 256))
        return bytes(new), "either", f"header byte {pos} set to {new[pos]}"
    pos = int(rng.integers(8 + n, len(raw)))
    new = bytearray(raw)
    new[pos] ^= 1 << int(rng.integers(8))
    return bytes(new), "correct", f"data byte {pos} flipped"


def config_corruption(rng, text):
    """(new bytes, expect, description) for adapter_config.json."""
    kind = pick(rng, {"edit": 8, "random": 2, "truncate": 2, "not object": 1, "utf8": 1,
                      "bom": 1, "deep": 1, "big int": 1})
    if kind == "edit":
        key, value, expect = CONFIG_EDITS[int(rng.integers(len(CONFIG_EDITS)))]
        cfg = json.loads(text)
        if value is DELETE:
            cfg.pop(key, None)
        else:
            cfg[key] = value(cfg.get(key) or {}) if callable(value) else value
        return json.dumps(cfg).encode(), expect, f"config {key} = " + (
            "<deleted>" if value is DELETE else repr(cfg[key]))
    if kind == "random":
        size = int(rng.integers(0, 300))
        return _random_bytes(rng, size), "error", f"{size} random bytes"
    if kind == "truncate":
        k = int(rng.integers(0, len(text.rstrip()) - 1))
        return text.encode()[:k], "error", f"config truncated to {k} bytes"
    if kind == "not object":
        bad = pick(rng, ["[]", "1", '"LORA"', "null", "[{}]"])
        return bad.encode(), "error", f"config {bad}"
    if kind == "utf8":
        return text.encode()[:10] + b"\xff\xfe\x80" + text.encode()[10:], "error", "invalid UTF-8"
    if kind == "bom":
        return b"\xef\xbb\xbf" + text.encode(), "correct", "UTF-8 BOM"
    if kind == "deep":
        depth = int(rng.integers(1000, 100000))
        return ("[" * depth + "]" * depth).encode(), "error", f"{depth}-deep array"
    return text.replace('"r": 2', '"r": 1' + "0" * 5000, 1).encode(), "error", "r with 5001 digits"


# ------------------------------------------------------------------ cases
class PeftCases:
    def __init__(self, rng, root):
        self.rng = rng
        self.root = pathlib.Path(root)
        self.templates = [Template(root, rng, k) for k in range(4)]
        self.count = 0

    def _dir(self):
        self.count += 1
        return self.root / f"case{self.count}"

    def _base(self, t):
        return pick(self.rng, [t.base, str(t.base_file), t.base_file])

    def _load_case(self, area, what, path, base, expect, names, template, watch_paths,
                   fan_in_fan_out=None):
        watch = Watch()
        for p in watch_paths:
            watch.state(f"files {p}", lambda p=p: tree_state(p), always=True)
        base_for_check = template.base if template else None

        def check(adapter):
            if not isinstance(adapter, LoraAdapter):
                raise AssertionError(f"returned {type(adapter).__name__}")
            check_loaded(adapter, path, base_for_check, fan_in_fan_out)

        return Case(area, what, lambda: LoraAdapter.from_peft(path, base), expect, check, names,
                    watch)

    def valid(self):
        t = pick(self.rng, self.templates)
        return self._load_case("from_peft", "valid adapter", t.dir, self._base(t), "correct", (),
                               t, [t.dir])

    def corrupt_config(self):
        t = pick(self.rng, self.templates)
        d = t.copy(self._dir())
        blob, expect, what = config_corruption(self.rng, t.config_text)
        (d / CONFIG).write_bytes(blob)
        return self._load_case("from_peft(corrupt config)", what, d, self._base(t), expect,
                               (CONFIG, "peft_type", "rank", "alpha"), t, [d])

    def corrupt_weights(self):
        t = pick(self.rng, self.templates)
        d = t.copy(self._dir())
        blob, expect, what = weights_corruption(self.rng, t.weights_bytes)
        (d / WEIGHTS).write_bytes(blob)
        if expect == "either":
            try:  # a header flip the header's own JSON shrugs off must load as it says
                read_independently(d / WEIGHTS)
            except Exception:  # noqa: BLE001 - unreadable here: must be refused there
                expect = "error"
        return self._load_case("from_peft(corrupt safetensors)", what, d, self._base(t), expect,
                               (WEIGHTS, "tensor"), t, [d])

    def bad_base(self):
        rng = self.rng
        t = pick(rng, self.templates)
        base = dict(t.base)
        key = pick(rng, list(base))
        kind = pick(rng, {"missing": 2, "shape": 2, "dtype": 2, "none": 1, "str": 1,
                          "two for one": 1, "not mapping": 2, "corrupt file": 2, "dir": 1,
                          "int file": 1, "list": 1, "no prefix": 1, "full prefix": 1})
        expect, names = "error", ("base weight", "base_weights", "base", "weight")
        if kind == "missing":
            del base[key]
        elif kind == "shape":
            base[key] = base[key].T.copy() if base[key].shape[0] != base[key].shape[1] else \
                base[key][:-1]
        elif kind == "dtype":
            base[key] = base[key].astype(pick(rng, ["i4", "c16", "?", "U3"]))
        elif kind == "none":
            base[key] = None
        elif kind == "str":
            base[key] = "weights"
        elif kind == "two for one":
            base[key.replace("model.", "", 1)] = base[key]
        elif kind == "not mapping":
            base = pick(rng, [None, 5, [t.base], b"base.safetensors", t.base[key]])
        elif kind == "corrupt file":
            p = self._dir()
            p.mkdir()
            f = p / "base.safetensors"
            f.write_bytes(rng.integers(0, 256, int(rng.integers(0, 64))).astype(
                np.uint8).tobytes())
            base = str(f)
        elif kind == "dir":
            base = str(t.dir)
        elif kind == "int file":
            p = self._dir()
            p.mkdir()
            save_file({k: v.astype(np.int32) for k, v in t.base.items()},
                      str(p / "base.safetensors"))
            base = p / "base.safetensors"
        elif kind == "list":
            base[key] = base[key].tolist()
            expect = "correct"
        elif kind == "no prefix":
            base = {k.replace("model.", "", 1): v for k, v in base.items()}
            expect = "correct"
        else:
            base = {PREFIX + k.replace("model.", "", 1): v for k, v in base.items()}
            expect = "correct"
        if isinstance(base, (str, os.PathLike)):
            names += (str(base),)
        case = self._load_case("from_peft(bad base_weights)", f"base_weights {kind}", t.dir, base,
                               expect, names, t, [t.dir])
        if expect == "correct":
            truth = base if kind == "list" else t.base
            case.check = lambda adapter: check_loaded(adapter, t.dir, truth)
        return case

    def bad_path(self):
        rng = self.rng
        t = pick(rng, self.templates)
        kind = pick(rng, ["none", "int", "bytes", "nul", "missing", "file", "no config",
                          "no weights", "pathlib", "pathlike bytes", "empty dir"])
        expect = "error"
        if kind == "none":
            path = None
        elif kind == "int":
            path = 5
        elif kind == "bytes":
            path = os.fsencode(t.dir)
        elif kind == "nul":
            path = str(t.dir) + "\x00x"
        elif kind == "missing":
            path = str(self.root / "does-not-exist")
        elif kind == "file":
            path = str(t.base_file)
        elif kind in ("no config", "no weights"):
            path = t.copy(self._dir())
            (path / (CONFIG if kind == "no config" else WEIGHTS)).unlink()
        elif kind == "pathlib":
            path, expect = pathlib.Path(t.dir), "correct"
        elif kind == "pathlike bytes":
            class BytesPath:
                def __fspath__(self):
                    return os.fsencode(t.dir)

                def __repr__(self):
                    return "BytesPath()"
            path = BytesPath()
        else:
            path = self._dir()
            path.mkdir()
        case = self._load_case("from_peft(bad path)", f"path {kind}", path, t.base, expect,
                               ("path", CONFIG, WEIGHTS, "does-not-exist", "NUL"), t,
                               [t.dir])
        if expect == "correct":
            case.check = lambda adapter: check_loaded(adapter, t.dir, t.base)
        return case

    def save(self):
        rng = self.rng
        t = pick(rng, self.templates)
        adapter = LoraAdapter.from_peft(t.dir, t.base)
        # (No merged adapter here: this group runs no kernels; merge_all is in the sessions.)
        kind = pick(rng, {"new": 3, "nested": 1, "overwrite": 2, "file": 2, "nul": 1, "none": 1,
                          "bytes": 1, "empty adapter": 1, "config changed": 2})
        target = self._dir()
        expect, names = "correct", ()
        if kind == "nested":
            target = target / "a" / "b"
        elif kind == "overwrite":
            t.copy(target)
        elif kind == "file":
            target.write_text("I am a file")
            expect, names = "error", ("directory", str(target))
        elif kind == "nul":
            target = str(target) + "\x00"
            expect, names = "error", ("path", "NUL")
        elif kind == "none":
            target = pick(rng, [None, 3, ["dir"]])
            expect, names = "error", ("path",)
        elif kind == "bytes":
            target = os.fsencode(target)
            expect, names = "error", ("path",)
        elif kind == "empty adapter":
            adapter = LoraAdapter(LoraConfig(2, 4.0))
            expect, names = "error", ("no layers", "adapter")
        elif kind == "config changed":
            setattr(adapter.config, pick(rng, ["rank", "alpha", "use_rslora"]),
                    pick(rng, [5, 3.5, True]) if rng.random() < 0.7 else -1)
            expect, names = "error", ("config", "rank", "alpha", "use_rslora")
        watch = Watch()
        watch.state("listing", lambda: sorted(os.listdir(self.root)))
        if isinstance(target, (str, os.PathLike, bytes)):
            where = pathlib.Path(os.fsdecode(target).replace("\x00", ""))
            watch.state("target", lambda: tree_state(where))
        before = {name: (layer.lora_a.copy(), layer.lora_b.copy(), layer.rank, layer.alpha,
                         layer.use_rslora) for name, layer in adapter.items()}
        config_before = (adapter.config.rank, adapter.config.alpha, adapter.config.use_rslora)

        def check(result):
            if result is not None:
                raise AssertionError(f"save_peft returned {result!r}")
            loaded = LoraAdapter.from_peft(target, t.base)
            if sorted(loaded.layer_names) != sorted(before):
                raise AssertionError("saved and loaded layer names differ")
            for name, (A, B, rank, alpha, rslora) in before.items():
                layer = loaded[name]
                if not (exact.same_bits(layer.lora_a, A) and exact.same_bits(layer.lora_b, B)):
                    raise AssertionError(f"{name}: factors changed in the round trip")
                if (layer.rank, layer.alpha, layer.use_rslora) != (rank, alpha, rslora):
                    raise AssertionError(f"{name}: rank/alpha/use_rslora changed")
            leftovers = [p.name for p in pathlib.Path(target).iterdir()
                         if p.name not in (CONFIG, WEIGHTS)]
            if leftovers:
                raise AssertionError(f"save_peft left {leftovers} behind")

        if kind == "config changed" and config_before == (t.config.rank, t.config.alpha,
                                                          t.config.use_rslora):
            expect = "correct"
        return Case("save_peft", f"save_peft {kind} -> {str(target)[-40:]!r}",
                    lambda: adapter.save_peft(target), expect, check, names, watch)


def peft_cases(rng):
    """from_peft on ~500 corrupt directories, hostile base weights and paths; save_peft."""
    root = tempfile.mkdtemp(prefix="numba_lora_hostile_")
    try:
        cases = PeftCases(rng, root)
        for _ in range(700):
            op = pick(rng, {"valid": 1, "corrupt_config": 5, "corrupt_weights": 7,
                            "bad_base": 3, "bad_path": 2, "save": 3})
            yield getattr(cases, op)()
    finally:
        shutil.rmtree(root, ignore_errors=True)

