"""LoraConfig and LoraAdapter: validation, mapping behaviour, totals, PEFT files without torch."""

import copy
import dataclasses
import json
import os
import pickle
import tempfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import save_file

import reference as ref
from numba_lora import (
    AdapterSummary,
    LoraAdapter,
    LoraConfig,
    LoraConfigError,
    LoraDtypeError,
    LoraFormatError,
    LoraKeyError,
    LoraLinear,
    LoraNonFiniteError,
    LoraTypeError,
    LoraUnsupportedError,
)
from numba_lora.config import pattern_key


# ------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0, lora_alpha=1.0), "rank must be an integer >= 1, got 0"),
        (dict(r=4, lora_alpha=0.0), "alpha must be a finite real number > 0, got 0.0"),
        (dict(r=4, lora_alpha=float("nan")), "got nan"),
        (dict(r=4, lora_alpha=1.0, lora_dropout=1.5), r"dropout must be a number in \[0, 1\], got 1.5"),
        (dict(r=4, lora_alpha=1.0, lora_dropout=-0.1), "got -0.1"),
        (dict(r=4, lora_alpha=1.0, lora_dropout=float("nan")), "got nan"),
        (dict(r=4, lora_alpha=1.0, rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]: rank must be"),
        (dict(r=4, lora_alpha=1.0, alpha_pattern={"v": -2}), r"alpha_pattern\['v'\]: alpha must be"),
        (dict(r=4, lora_alpha=1.0, rank_pattern={"(": 2}), "not a valid regular expression"),
        (dict(r=4, lora_alpha=1.0, target_modules=[1]), "target_modules must hold strings"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(LoraConfigError, match=match):
        LoraConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank_pattern=[("q", 2)]), "rank_pattern must be a dict"),
        (dict(rank_pattern="q"), "rank_pattern must be a dict"),
        (dict(rank_pattern={"q": {"r": 2}}), r"rank_pattern\['q'\]: rank must be an integer"),
        (dict(rank_pattern={"q": None}), r"rank_pattern\['q'\]: rank must be"),
        (dict(rank_pattern={"q": "2"}), r"rank_pattern\['q'\]: rank must be"),
        (dict(rank_pattern={3: 2}), "rank_pattern keys must be strings"),
        (dict(rank_pattern={"(?i)q": 2}), "not a valid regular expression"),
        (dict(alpha_pattern=[1.0]), "alpha_pattern must be a dict"),
        (dict(alpha_pattern={"v": [1.0]}), r"alpha_pattern\['v'\]: alpha must be"),
        (dict(alpha_pattern={"v": True}), r"alpha_pattern\['v'\]: alpha must be"),
        (dict(target_modules=5), "target_modules must be a string or a sequence of strings, got int"),
        (dict(target_modules=[b"q"]), "target_modules must hold strings"),
        (dict(target_modules={"q": 1}), "target_modules must be a string or a sequence"),
        (dict(fan_in_fan_out="false"), "fan_in_fan_out must be True or False, got str"),
        (dict(use_rslora=None), "use_rslora must be True or False"),
        (dict(lora_dropout="0.1"), "dropout must be a number"),
        (dict(lora_dropout=10**400), "dropout must be a number"),
        (dict(lora_alpha=10**400), "alpha must be a finite real number"),
        (dict(r=2.0), "rank must be an integer"),
        (dict(r=None), "rank must be an integer"),
    ],
)
def test_config_wrong_types_are_config_errors(kwargs, match):
    kwargs = dict(rank=4, alpha=1.0) | kwargs
    with pytest.raises(LoraConfigError, match=match) as info:
        LoraConfig(**kwargs)
    assert isinstance(info.value, ValueError)


def test_config_accepts_what_peft_writes():
    config = LoraConfig(r=np.int64(4), lora_alpha=np.float32(8), target_modules=None,
                        rank_pattern=None, alpha_pattern=None, use_rslora=np.bool_(True))
    assert (config.r, config.lora_alpha, config.target_modules) == (4, 8.0, ())
    assert config.rank_pattern == {} and config.use_rslora is True
    assert LoraConfig(r=2, lora_alpha=1, target_modules="q|v").target_modules == ("q|v",)
    assert LoraConfig(r=2, lora_alpha=1, target_modules=["q", "v"]).target_modules == ("q", "v")


def test_config_refused_validate_changes_nothing():
    config = LoraConfig(r=4, lora_alpha=8, rank_pattern={"q": 2})
    config.lora_alpha = 16
    config.rank_pattern = [("q", 2)]
    with pytest.raises(LoraConfigError, match="rank_pattern"):
        config.validate()
    assert config.lora_alpha == 16 and config.rank_pattern == [("q", 2)]


@pytest.mark.parametrize("copier", [copy.copy, copy.deepcopy, lambda c: pickle.loads(pickle.dumps(c))])
def test_config_pickles_and_copies(copier):
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=("q", "v"), fan_in_fan_out=True,
                        use_rslora=True, rank_pattern={"q": 2}, alpha_pattern={"v": 3.0})
    other = copier(config)
    assert other == config and other is not config
    if copier is not copy.copy:
        other.rank_pattern["k"] = 1
        assert "k" not in config.rank_pattern


def test_config_validate_after_change():
    config = LoraConfig(r=4, lora_alpha=8)
    config.lora_dropout = 2.0
    with pytest.raises(LoraConfigError, match="dropout"):
        config.validate()


def test_pattern_matching_follows_peft():
    patterns = {"q_proj": 1, r"layers\.1\.v_proj": 2, "mlp.*": 3}
    assert pattern_key(patterns, "model.layers.0.q_proj") == "q_proj"
    assert pattern_key(patterns, "q_proj") == "q_proj"
    assert pattern_key(patterns, "model.layers.0.xq_proj") is None  # whole components only
    assert pattern_key(patterns, "model.layers.1.v_proj") == r"layers\.1\.v_proj"
    assert pattern_key(patterns, "model.layers.11.v_proj") is None
    assert pattern_key(patterns, "model.mlp.fc1") == "mlp.*"
    config = LoraConfig(r=8, lora_alpha=16, rank_pattern={"fc": 2}, alpha_pattern={"fc": 3.0})
    assert (config.rank_for("layers.0.fc"), config.alpha_for("layers.0.fc")) == (2, 3.0)
    assert (config.rank_for("layers.0.q"), config.alpha_for("layers.0.q")) == (8, 16.0)


# ----------------------------------------------------------------- adapter
def make_adapter(rng, dtype=np.float32, **config):
    adapter = LoraAdapter(LoraConfig(r=config.pop("r", 4), lora_alpha=config.pop("lora_alpha", 8), **config))
    for name, shape in (("layers.0.q_proj", (24, 16)), ("layers.0.v_proj", (16, 16)),
                        ("layers.1.fc", (32, 16))):
        layer = adapter.add_layer(name, rng.standard_normal(shape).astype(dtype), seed=1)
        layer.lora_b = rng.standard_normal((shape[0], layer.rank))
    return adapter


def test_totals_example():
    adapter = LoraAdapter(LoraConfig(r=8, lora_alpha=16))
    assert adapter.overall_compression_ratio == 0.0
    assert adapter.summary() == AdapterSummary(0, 0, 0, 0.0, 8, 16.0)
    adapter.add_layer("a", np.zeros((64, 32)))
    adapter.add_layer("b", np.zeros((64, 32)))
    assert adapter.total_trainable_params == 1536
    assert adapter.total_original_params == 4096
    assert adapter.overall_compression_ratio == pytest.approx(1536 / 5632)
    assert adapter.summary() == AdapterSummary(
        num_layers=2, total_trainable=1536, total_original=4096,
        compression_ratio=1536 / 5632, rank=8, alpha=16.0)


def test_mapping_behaviour(rng):
    adapter = make_adapter(rng)
    names = ["layers.0.q_proj", "layers.0.v_proj", "layers.1.fc"]
    assert adapter.layer_names == names and list(adapter) == names
    assert len(adapter) == 3 and "layers.1.fc" in adapter and "fc" not in adapter
    assert adapter["layers.0.v_proj"].out_features == 16
    assert [n for n, _ in adapter.items()] == names
    with pytest.raises(LoraKeyError, match="adapter has no layer named 'nope'") as info:
        adapter["nope"]
    assert isinstance(info.value, KeyError)
    with pytest.raises(LoraKeyError, match="'nope'"):
        adapter.forward_layer("nope", np.ones(16))
    with pytest.raises(LoraConfigError, match="already has a layer named 'layers.1.fc'"):
        adapter.add_layer("layers.1.fc", np.ones((4, 4)))
    with pytest.raises(LoraConfigError, match="non-empty string"):
        adapter.add_layer("", np.ones((4, 4)))
    with pytest.raises(TypeError, match="LoraConfig"):
        LoraAdapter({"rank": 4})


def test_patterns_apply_per_layer(rng):
    adapter = make_adapter(rng, rank_pattern={"fc": 2}, alpha_pattern={"fc": 3.0}, use_rslora=True)
    fc, q = adapter["layers.1.fc"], adapter["layers.0.q_proj"]
    assert (fc.rank, fc.alpha, fc.scaling) == (2, 3.0, pytest.approx(3.0 / np.sqrt(2)))
    assert (q.rank, q.alpha, q.scaling) == (4, 8.0, 4.0)


def test_forward_layer_and_batch(rng):
    adapter = make_adapter(rng)
    layer = adapter["layers.0.q_proj"]
    X = rng.standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_array_equal(adapter.forward_batch_layer("layers.0.q_proj", X), layer.forward_batch(X))
    np.testing.assert_array_equal(adapter.forward_layer("layers.0.q_proj", X[0]), layer.forward(X[0]))


def test_merge_all_and_unmerge_all_are_idempotent(rng):
    adapter = make_adapter(rng)
    X = rng.standard_normal((3, 16)).astype(np.float32)
    before = {n: adapter.forward_batch_layer(n, X) for n in adapter}
    adapter["layers.0.v_proj"].merge()
    w_v = adapter["layers.0.v_proj"].weight.copy()
    adapter.merge_all()  # merges only the other two
    np.testing.assert_array_equal(adapter["layers.0.v_proj"].weight, w_v)
    assert all(adapter[n].is_merged for n in adapter)
    adapter.merge_all()
    for n in adapter:
        ref.assert_close(adapter.forward_batch_layer(n, X), before[n], np.abs(before[n]) + 10, np.float32)
    adapter["layers.1.fc"].unmerge()
    adapter.unmerge_all()
    adapter.unmerge_all()
    assert not any(adapter[n].is_merged for n in adapter)


def test_enable_disable_all(rng):
    adapter = make_adapter(rng)
    x = rng.standard_normal(16).astype(np.float32)
    adapter.disable_all()
    assert not any(layer.is_enabled for _, layer in adapter.items())
    base = adapter["layers.0.q_proj"].forward(x)
    adapter.enable_all()
    assert all(layer.is_enabled for _, layer in adapter.items())
    assert not np.allclose(adapter["layers.0.q_proj"].forward(x), base)


def test_checked_merge_all_refuses_before_touching_any_layer(rng):
    adapter = make_adapter(rng)
    a = np.array(adapter["layers.1.fc"].lora_a)
    a[0, 0] = 3e38
    adapter["layers.1.fc"].lora_a = a
    adapter["layers.1.fc"].lora_b = np.ones((32, 4))
    weights = {n: layer.weight.copy() for n, layer in adapter.items()}
    with pytest.raises(LoraNonFiniteError, match="merging layer 'layers.1.fc'"):
        adapter.merge_all(check_finite=True)
    for n, layer in adapter.items():
        assert not layer.is_merged
        np.testing.assert_array_equal(layer.weight, weights[n])


def test_fan_in_fan_out_transposes_base_weights(rng):
    adapter = LoraAdapter(LoraConfig(r=2, lora_alpha=4, fan_in_fan_out=True))
    W_conv1d = rng.standard_normal((16, 24))  # (in, out), as GPT-2's Conv1D stores it
    layer = adapter.add_layer("c_attn", W_conv1d)
    assert (layer.in_features, layer.out_features) == (16, 24)
    x = rng.standard_normal(16)
    np.testing.assert_allclose(layer.forward(x), x @ W_conv1d, rtol=1e-12)


# ------------------------------------------------------- PEFT files, no torch
def test_save_then_load_round_trip(tmp_path, rng):
    adapter = make_adapter(rng, rank_pattern={"fc": 2}, alpha_pattern={"fc": 3.0}, use_rslora=True)
    adapter.save_peft(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 8 and saved["use_rslora"] is True
    assert saved["target_modules"] == adapter.layer_names
    assert saved["rank_pattern"] == {"fc": 2}
    base = {f"{n}.weight": layer.weight for n, layer in adapter.items()}
    loaded = LoraAdapter.from_peft(tmp_path, base)
    assert loaded.layer_names == adapter.layer_names
    x = rng.standard_normal((2, 16)).astype(np.float32)
    for n in adapter:
        np.testing.assert_array_equal(loaded[n].lora_a, adapter[n].lora_a)
        np.testing.assert_array_equal(loaded[n].lora_b, adapter[n].lora_b)
        assert loaded[n].scaling == adapter[n].scaling
        np.testing.assert_array_equal(loaded.forward_batch_layer(n, x), adapter.forward_batch_layer(n, x))


def write_adapter(path, config=None, tensors=None):
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"]} | (config or {})
    if tensors is None:
        tensors = {"base_model.model.layers.0.q.lora_A.weight": np.ones((2, 6), np.float32),
                   "base_model.model.layers.0.q.lora_B.weight": np.ones((5, 2), np.float32)}
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


BASE = {"model.layers.0.q.weight": np.ones((5, 6), np.float32)}


@pytest.mark.parametrize("key", ["layers.0.q", "layers.0.q.weight", "model.layers.0.q.weight",
                                 "base_model.model.layers.0.q.weight"])
def test_base_weight_names(tmp_path, key):
    adapter = LoraAdapter.from_peft(write_adapter(tmp_path), {key: np.ones((5, 6))})
    assert adapter.layer_names == ["layers.0.q"]
    assert adapter["layers.0.q"].scaling == 2.0


def test_base_weights_from_a_safetensors_file(tmp_path):
    save_file(BASE, str(tmp_path / "model.safetensors"))
    adapter = LoraAdapter.from_peft(write_adapter(tmp_path / "a"), tmp_path / "model.safetensors")
    assert adapter["layers.0.q"].weight.shape == (5, 6)


def test_bfloat16_tensors_are_widened(tmp_path):
    # bfloat16 1.5 is 0x3FC0; written by hand since NumPy has no bfloat16.
    path = write_adapter(tmp_path)
    header = {"base_model.model.layers.0.q.lora_A.weight":
              {"dtype": "BF16", "shape": [2, 6], "data_offsets": [0, 24]},
              "base_model.model.layers.0.q.lora_B.weight":
              {"dtype": "BF16", "shape": [5, 2], "data_offsets": [24, 44]}}
    blob = json.dumps(header).encode()
    data = np.full(22, 0x3FC0, "<u2").tobytes()
    (path / "adapter_model.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob + data)
    adapter = LoraAdapter.from_peft(path, BASE)
    np.testing.assert_array_equal(adapter["layers.0.q"].lora_a, 1.5)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"use_dora": True}, "use_dora"),
        ({"lora_bias": True}, "lora_bias"),
        ({"bias": "all"}, "bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"layer_replication": [[0, 1]]}, "layer_replication"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
        ({"target_parameters": ["w"]}, "target_parameters"),
        ({"peft_type": "IA3"}, "only LORA"),
    ],
)
def test_unsupported_config_features_are_refused(tmp_path, config, match):
    with pytest.raises(LoraUnsupportedError, match=match) as info:
        LoraAdapter.from_peft(write_adapter(tmp_path, config=config), BASE)
    assert isinstance(info.value, NotImplementedError)


A_KEY = "base_model.model.layers.0.q.lora_A.weight"
B_KEY = "base_model.model.layers.0.q.lora_B.weight"


@pytest.mark.parametrize(
    "tensors, error, match",
    [
        ({A_KEY: np.ones((2, 6)), B_KEY: np.ones((5, 2)),
          "base_model.model.embed.lora_embedding_A": np.ones((2, 9))}, LoraUnsupportedError, "embedding"),
        ({A_KEY: np.ones((2, 6)), B_KEY: np.ones((5, 2)),
          "base_model.model.layers.0.q.lora_magnitude_vector": np.ones(5)}, LoraUnsupportedError, "DoRA"),
        ({A_KEY: np.ones((2, 6)), B_KEY: np.ones((5, 2)),
          "base_model.model.layers.0.q.lora_B.bias": np.ones(5)}, LoraUnsupportedError, "lora_bias"),
        ({A_KEY: np.ones((2, 6, 1, 1)), B_KEY: np.ones((5, 2, 1, 1))}, LoraUnsupportedError, "convolution"),
        ({A_KEY: np.ones((2, 6))}, LoraFormatError, f"'{A_KEY}' has no matching lora_B"),
        ({B_KEY: np.ones((5, 2))}, LoraFormatError, f"'{B_KEY}' has no matching lora_A"),
        ({A_KEY: np.ones((2, 6)), B_KEY: np.ones((5, 3))}, LoraFormatError, f"'{B_KEY}' has shape \\(5, 3\\)"),
        ({A_KEY: np.ones((3, 6)), B_KEY: np.ones((5, 3))}, LoraFormatError, "has rank 3, but adapter_config.json gives"),
        ({A_KEY: np.ones((2, 7)), B_KEY: np.ones((5, 2))}, LoraFormatError,
         r"base weight 'model.layers.0.q.weight' has shape \(5, 6\)"),
        ({A_KEY: np.ones((2, 6)), B_KEY: np.ones((5, 2)), "base_model.model.x.weight": np.ones(3)},
         LoraFormatError, "'base_model.model.x.weight' is not a lora_A or lora_B weight"),
        ({}, LoraFormatError, "holds no LoRA tensors"),
    ],
)
def test_malformed_adapter_files(tmp_path, tensors, error, match):
    tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    path = write_adapter(tmp_path, tensors=tensors)
    with pytest.raises(error, match=match):
        LoraAdapter.from_peft(path, BASE)


def test_missing_base_weight_names_the_module(tmp_path):
    with pytest.raises(LoraKeyError, match="no base weight for adapter module 'layers.0.q'"):
        LoraAdapter.from_peft(write_adapter(tmp_path), {"layers.0.k.weight": np.ones((5, 6))})


def test_missing_files(tmp_path):
    with pytest.raises(LoraFormatError, match="has no adapter_config.json"):
        LoraAdapter.from_peft(tmp_path, BASE)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    with pytest.raises(LoraFormatError, match="has no adapter_model.safetensors"):
        LoraAdapter.from_peft(tmp_path, BASE)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoraFormatError, match="not valid JSON"):
        LoraAdapter.from_peft(tmp_path, BASE)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_alpha": 4}))
    with pytest.raises(LoraFormatError, match="has no 'r'"):
        LoraAdapter.from_peft(tmp_path, BASE)


def test_save_empty_adapter_is_refused(tmp_path):
    with pytest.raises(LoraFormatError, match="no layers"):
        LoraAdapter(LoraConfig(r=2, lora_alpha=4)).save_peft(tmp_path)


# ------------------------------------------------ adapter_config.json contents
@pytest.mark.parametrize(
    "config, key, match",
    [
        ({"r": "4"}, "r", "rank must be an integer"),
        ({"r": [4]}, "r", "rank must be an integer"),
        ({"r": None}, "r", "is null"),
        ({"r": 2.0}, "r", "rank must be an integer"),
        ({"lora_alpha": "4"}, "lora_alpha", "alpha must be a finite real number"),
        ({"lora_alpha": {"a": 1}}, "lora_alpha", "alpha must be"),
        ({"lora_alpha": 10**400}, "lora_alpha", "alpha must be"),
        ({"rank_pattern": ["q", 2]}, "rank_pattern", "must be a dict"),
        ({"rank_pattern": "q"}, "rank_pattern", "must be a dict"),
        ({"rank_pattern": {"q": {"r": 2}}}, "rank_pattern", r"rank_pattern\['q'\]"),
        ({"alpha_pattern": [1]}, "alpha_pattern", "must be a dict"),
        ({"alpha_pattern": {"q": None}}, "alpha_pattern", r"alpha_pattern\['q'\]"),
        ({"target_modules": 5}, "target_modules", "must be a string or a sequence"),
        ({"target_modules": ["q", 1]}, "target_modules", "must hold strings"),
        ({"target_modules": {"q": 1}}, "target_modules", "must be a string or a sequence"),
        ({"use_rslora": "false"}, "use_rslora", "must be True or False"),
        ({"fan_in_fan_out": 1}, "fan_in_fan_out", "must be True or False"),
        ({"lora_dropout": "0.1"}, "lora_dropout", "dropout must be a number"),
    ],
)
def test_wrong_json_types_name_the_key(tmp_path, config, key, match):
    path = write_adapter(tmp_path, config=config)
    with pytest.raises(LoraFormatError, match=match) as info:
        LoraAdapter.from_peft(path, BASE)
    assert f"'{key}'" in str(info.value) and "adapter_config.json" in str(info.value)


def test_nulls_peft_writes_are_defaults(tmp_path):
    path = write_adapter(tmp_path, config={"rank_pattern": None, "alpha_pattern": None,
                                           "target_modules": None, "lora_dropout": None,
                                           "use_rslora": None, "fan_in_fan_out": None})
    adapter = LoraAdapter.from_peft(path, BASE)
    assert adapter.config.rank_pattern == {} and adapter.config.use_rslora is False


@pytest.mark.parametrize(
    "raw, match",
    [
        (b"\xff\xfe{\x00}\x00", "is not UTF-8 text"),
        ("{\"r\": 2, \"lora_alpha\": 4}".encode("utf-16"), "is not UTF-8 text"),
        (b"{not json", "is not valid JSON"),
        (b"[" * 100000 + b"]" * 100000, "is not valid JSON"),
        (b"[1, 2]", "must hold a JSON object, got list"),
        (b"", "is not valid JSON"),
    ],
)
def test_unreadable_config_files(tmp_path, raw, match):
    path = write_adapter(tmp_path)
    (path / "adapter_config.json").write_bytes(raw)
    with pytest.raises(LoraFormatError, match=match) as info:
        LoraAdapter.from_peft(path, BASE)
    assert "adapter_config.json" in str(info.value)


def test_a_utf8_bom_is_accepted(tmp_path):
    path = write_adapter(tmp_path)
    text = (path / "adapter_config.json").read_text()
    (path / "adapter_config.json").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert LoraAdapter.from_peft(path, BASE).layer_names == ["layers.0.q"]


# -------------------------------------------- tensors and base weights, refused
def test_two_tensors_for_one_factor_are_refused(tmp_path):
    tensors = {A_KEY: np.ones((2, 6), np.float32), B_KEY: np.ones((5, 2), np.float32),
               "layers.0.q.lora_A.weight": 2 * np.ones((2, 6), np.float32)}
    path = write_adapter(tmp_path, tensors=tensors)
    with pytest.raises(LoraFormatError, match="are both the lora_A weight of module 'layers.0.q'") as info:
        LoraAdapter.from_peft(path, BASE)
    assert A_KEY in str(info.value) and "'layers.0.q.lora_A.weight'" in str(info.value)


@pytest.mark.parametrize(
    "base",
    [
        {"model.layers.0.q.weight": np.ones((5, 6)), "layers.0.q.weight": np.ones((5, 6))},
        {"layers.0.q": np.ones((5, 6)), "layers.0.q.weight": np.ones((5, 6))},
        {"base_model.model.layers.0.q.weight": np.ones((5, 6)), "layers.0.q": np.ones((5, 6))},
    ],
)
def test_two_base_weights_for_one_module_are_refused(tmp_path, base):
    with pytest.raises(LoraFormatError, match="2 weights for adapter module 'layers.0.q'") as info:
        LoraAdapter.from_peft(write_adapter(tmp_path), base)
    for key in base:
        assert repr(key) in str(info.value)


def test_two_base_weights_in_a_file_are_refused(tmp_path):
    save_file({"model.layers.0.q.weight": np.ones((5, 6), np.float32),
               "layers.0.q.weight": np.ones((5, 6), np.float32)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(LoraFormatError, match="m.safetensors holds 2 weights"):
        LoraAdapter.from_peft(write_adapter(tmp_path / "a"), tmp_path / "m.safetensors")


def test_an_unused_base_ambiguity_is_harmless(tmp_path):
    base = dict(BASE) | {"model.k.weight": np.ones(3), "k.weight": np.ones(3)}
    assert LoraAdapter.from_peft(write_adapter(tmp_path), base).layer_names == ["layers.0.q"]


def bf16_file(path, header, data):
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


@pytest.mark.parametrize(
    "base, error, match",
    [
        ([np.ones((5, 6))], LoraTypeError, "base_weights must be a mapping .* got list"),
        (5, LoraTypeError, "got int"),
        (None, LoraTypeError, "got NoneType"),
        ({"layers.0.q": np.ones((5, 6), np.int32)}, LoraDtypeError,
         "base weight 'layers.0.q' has dtype int32"),
        ({"layers.0.q": np.ones((5, 6), complex)}, LoraDtypeError, "has dtype complex128"),
        ({"layers.0.q": [[1.0] * 6] * 4 + [[1.0]]}, LoraDtypeError, "base weight 'layers.0.q'"),
        ({"layers.0.q": "abc"}, LoraDtypeError, "has dtype <U3"),
    ],
)
def test_bad_base_weights(tmp_path, base, error, match):
    with pytest.raises(error, match=match):
        LoraAdapter.from_peft(write_adapter(tmp_path), base)


def test_base_weights_path_problems(tmp_path):
    adapter_dir = write_adapter(tmp_path / "a")
    # A directory is a model directory: it must hold one set of safetensors weights.
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraFormatError, match=r"empty holds no safetensors weights"):
        LoraAdapter.from_peft(adapter_dir, tmp_path / "empty")
    with pytest.raises(LoraFormatError, match="does not exist"):
        LoraAdapter.from_peft(adapter_dir, tmp_path / "nope.safetensors")
    save_file({"layers.0.q.weight": np.ones((5, 6), np.int32)}, str(tmp_path / "int.safetensors"))
    with pytest.raises(LoraFormatError, match=r"int.safetensors: tensor 'layers.0.q.weight' has dtype I32"):
        LoraAdapter.from_peft(adapter_dir, tmp_path / "int.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(LoraFormatError, match="junk.safetensors is 3 bytes long"):
        LoraAdapter.from_peft(adapter_dir, tmp_path / "junk.safetensors")


@pytest.mark.parametrize(
    "dtype, nbytes, match",
    [("I32", 4, "has dtype I32; LoRA factors must be floating point"),
     ("F8_E4M3", 1, "has dtype F8_E4M3; LoRA factors must be floating point"),
     ("C64", 8, "has dtype C64")],
)
def test_factor_dtypes_that_cannot_be_used(tmp_path, dtype, nbytes, match):
    path = write_adapter(tmp_path)
    header = {A_KEY: {"dtype": dtype, "shape": [2, 6], "data_offsets": [0, 12 * nbytes]},
              B_KEY: {"dtype": "F32", "shape": [5, 2], "data_offsets": [12 * nbytes, 12 * nbytes + 40]}}
    bf16_file(path / "adapter_model.safetensors", header, bytes(12 * nbytes + 40))
    with pytest.raises(LoraFormatError, match=match) as info:
        LoraAdapter.from_peft(path, BASE)
    assert "adapter_model.safetensors" in str(info.value) and A_KEY in str(info.value)


def test_a_truncated_adapter_file(tmp_path):
    path = write_adapter(tmp_path)
    blob = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(blob[:-7])
    with pytest.raises(LoraFormatError, match="truncated") as info:
        LoraAdapter.from_peft(path, BASE)
    assert "adapter_model.safetensors" in str(info.value)


@pytest.mark.parametrize("path", [None, 3, ["dir"]])
def test_from_peft_path_must_be_a_path(path):
    with pytest.raises(LoraTypeError, match="path must be a str or os.PathLike"):
        LoraAdapter.from_peft(path, BASE)


def test_layer_order_survives_a_round_trip(tmp_path, rng):
    adapter = LoraAdapter(LoraConfig(r=2, lora_alpha=4))
    names = ["z.last", "a.first", "m.middle"]
    for name in names:
        adapter.add_layer(name, rng.standard_normal((4, 3)))
    adapter.save_peft(tmp_path)
    base = {f"{n}.weight": adapter[n].weight for n in names}
    assert LoraAdapter.from_peft(tmp_path, base).layer_names == names


# ----------------------------------------------------------------- layer names
@pytest.mark.parametrize(
    "name, match",
    [
        ("", "non-empty string"),
        ("a..b", "empty component"),
        (".a", "empty component"),
        ("a.", "empty component"),
        ("a b", "whitespace"),
        ("a\tb", "whitespace"),
        ("a\x00b", "non-printable"),
        ("a\u200bb", "non-printable"),
        ("x.lora_A.y", "'lora_A'"),
        ("x.lora_B", "'lora_B'"),
        ("lora_A", "'lora_A'"),
        ("x.lora_embedding_A", "lora_embedding_A"),
        ("emb.lora_embedding_B.q", "lora_embedding_B"),
        ("q.lora_magnitude_vector", "lora_magnitude_vector"),
        ("modules_to_save.x", "modules_to_save"),
        ("base_model.model.x", "starts with 'base_model.model.'"),
    ],
)
def test_names_save_peft_cannot_round_trip_are_refused(name, match):
    adapter = LoraAdapter(LoraConfig(r=1, lora_alpha=1))
    adapter.add_layer("kept", np.ones((2, 2)))
    with pytest.raises(LoraConfigError, match=match):
        adapter.add_layer(name, np.ones((2, 2)))
    assert adapter.layer_names == ["kept"]


@pytest.mark.parametrize("name", [5, None, b"q", ("q",)])
def test_non_string_names_are_type_errors(name):
    adapter = LoraAdapter(LoraConfig(r=1, lora_alpha=1))
    with pytest.raises(LoraTypeError, match="layer name must be a str"):
        adapter.add_layer(name, np.ones((2, 2)))
    assert len(adapter) == 0


@pytest.mark.parametrize("first, second", [("x", "model.x"), ("model.x", "x"),
                                           ("model.x", "model.model.x"), ("model.model.x", "model.x")])
def test_names_that_share_a_base_weight_are_refused(first, second):
    adapter = LoraAdapter(LoraConfig(r=1, lora_alpha=1))
    adapter.add_layer(first, np.ones((2, 2)))
    with pytest.raises(LoraConfigError, match=f"clashes with layer '{first}'"):
        adapter.add_layer(second, np.ones((2, 2)))
    assert adapter.layer_names == [first]


_COMPONENTS = st.one_of(
    st.sampled_from(["model", "layers", "0", "q_proj", "lora_A", "lora_B", "lora_", "weight",
                     "base_model", "lora_embedding_A", "modules_to_save", "", " ", "x y", "é",
                     "\t", "-", "lora_A_x", "default"]),
    st.text(max_size=4),
)
_NAMES = st.lists(_COMPONENTS, min_size=1, max_size=5).map(".".join)


@given(names=st.lists(_NAMES, min_size=1, max_size=6), seed=st.integers(0, 2**32 - 1))
def test_every_accepted_name_survives_save_and_load(names, seed):
    rng = np.random.default_rng(seed)
    adapter = LoraAdapter(LoraConfig(r=2, lora_alpha=3, rank_pattern={"q_proj": 1}))
    for name in names:
        try:
            layer = adapter.add_layer(name, rng.standard_normal((3, 4)).astype(np.float32))
        except (LoraConfigError, LoraTypeError):
            continue
        layer.lora_b = rng.standard_normal((3, layer.rank))
    if not len(adapter):
        return
    with tempfile.TemporaryDirectory() as tmp:
        adapter.save_peft(tmp)
        base = {f"{n}.weight": layer.weight for n, layer in adapter.items()}
        loaded = LoraAdapter.from_peft(tmp, base)
    assert loaded.layer_names == adapter.layer_names
    assert loaded.config == dataclasses.replace(adapter.config,
                                                target_modules=tuple(adapter.layer_names))
    for name, layer in adapter.items():
        got = loaded[name]
        assert (got.rank, got.alpha, got.scaling) == (layer.rank, layer.alpha, layer.scaling)
        for attr in ("weight", "lora_a", "lora_b"):
            np.testing.assert_array_equal(getattr(got, attr), getattr(layer, attr))


# ------------------------------------------------------------- atomic saving
def failing_save(tensors, filename, metadata=None):
    with open(filename, "wb") as fh:
        fh.write(b"half a safetensors file")
    raise OSError("disk full (simulated)")


def snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_failed_save_leaves_no_files(tmp_path, rng, monkeypatch):
    import safetensors.numpy

    adapter = make_adapter(rng)
    (tmp_path / "other.txt").write_text("not ours")
    old = tmp_path / "old"
    adapter.save_peft(old)
    before = snapshot(tmp_path)
    monkeypatch.setattr(safetensors.numpy, "save_file", failing_save)
    for target in (tmp_path, old, tmp_path / "new" / "deeper"):
        with pytest.raises(OSError, match="disk full"):
            adapter.save_peft(target)
        assert snapshot(tmp_path) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "other.txt"]


@pytest.mark.parametrize("fail_on", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_failed_rename_restores_the_directory(tmp_path, rng, monkeypatch, fail_on):
    adapter = make_adapter(rng)
    make_adapter(rng, r=2).save_peft(tmp_path / "old")
    before = snapshot(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if str(src).endswith(".tmp") and str(dst).endswith(fail_on):  # new file into place
            raise OSError("rename failed (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    for target in (tmp_path / "old", tmp_path / "new"):
        with pytest.raises(OSError, match="rename failed"):
            adapter.save_peft(target)
        assert snapshot(tmp_path) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_save_refuses_a_config_changed_after_the_layers(tmp_path, rng):
    adapter = make_adapter(rng)
    adapter.config.lora_alpha = 99.0
    with pytest.raises(LoraConfigError, match=r"layer 'layers.0.q_proj' has \(rank, alpha, use_rslora\)"):
        adapter.save_peft(tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_save_to_a_file_or_a_bad_path(tmp_path, rng):
    adapter = make_adapter(rng)
    (tmp_path / "f").write_text("x")
    with pytest.raises(LoraConfigError, match="exists and is not a directory"):
        adapter.save_peft(tmp_path / "f")
    with pytest.raises(LoraTypeError, match="path must be a str or os.PathLike"):
        adapter.save_peft(None)
    assert (tmp_path / "f").read_text() == "x"


# ------------------------------------------------------------ pickle and copy
def assert_same_adapter(a, b):
    assert a.config == b.config and a.layer_names == b.layer_names
    for name, layer in a.items():
        other = b[name]
        assert (other.rank, other.alpha, other.scaling, other.use_rslora, other.is_merged,
                other.is_enabled) == (layer.rank, layer.alpha, layer.scaling, layer.use_rslora,
                                      layer.is_merged, layer.is_enabled)
        for attr in ("weight", "lora_a", "lora_b"):
            x, y = getattr(layer, attr), getattr(other, attr)
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
            assert not np.shares_memory(x, y)
        if hasattr(layer, "_lock"):  # layers that lock get a lock of their own
            assert other._lock is not layer._lock


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda a: pickle.loads(pickle.dumps(a))],
                         ids=["deepcopy", "pickle"])
def test_adapter_pickles_and_deep_copies(copier, rng):
    adapter = make_adapter(rng, rank_pattern={"fc": 2}, use_rslora=True)
    adapter["layers.0.v_proj"].merge()
    adapter["layers.1.fc"].disable()
    other = copier(adapter)
    assert_same_adapter(adapter, other)
    other.add_layer("extra", np.ones((8, 8)))
    other["layers.0.q_proj"].lora_b = np.zeros((24, 4))
    other.config.rank_pattern["q"] = 1
    assert "extra" not in adapter and adapter.config.rank_pattern == {"fc": 2}
    assert np.abs(adapter["layers.0.q_proj"].lora_b).sum() > 0


def test_adapter_shallow_copy_has_its_own_mapping(rng):
    adapter = make_adapter(rng)
    other = copy.copy(adapter)
    other.add_layer("extra", np.ones((8, 8)))
    assert "extra" not in adapter and other["layers.1.fc"] is adapter["layers.1.fc"]


# --------------------------------------------------------------- constructors
def test_adapter_constructor_and_seed_types():
    with pytest.raises(LoraTypeError, match="config must be a LoraConfig, got dict"):
        LoraAdapter({"rank": 4, "alpha": 8})
    adapter = LoraAdapter(LoraConfig(r=1, lora_alpha=1))
    with pytest.raises(LoraTypeError, match="seed must be"):
        adapter.add_layer("x", np.ones((2, 2)), seed="abc")
    with pytest.raises(LoraConfigError, match="seed -1 is out of range"):
        adapter.add_layer("x", np.ones((2, 2)), seed=-1)
    assert len(adapter) == 0
    seeded = adapter.add_layer("x", np.ones((2, 2)), seed=7)
    np.testing.assert_array_equal(seeded.lora_a, LoraLinear(np.ones((2, 2)), 1, 1, seed=7).lora_a)
