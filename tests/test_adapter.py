"""LoraConfig and LoraAdapter: validation, mapping behaviour, totals, PEFT files without torch."""

import copy
import json
import pickle

import numpy as np
import pytest
from safetensors.numpy import save_file

import reference as ref
from numba_lora import (
    AdapterSummary,
    LoraAdapter,
    LoraConfig,
    LoraConfigError,
    LoraFormatError,
    LoraKeyError,
    LoraNonFiniteError,
    LoraUnsupportedError,
)
from numba_lora.config import pattern_key


# ------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0, alpha=1.0), "rank must be an integer >= 1, got 0"),
        (dict(rank=4, alpha=0.0), "alpha must be a finite real number > 0, got 0.0"),
        (dict(rank=4, alpha=float("nan")), "got nan"),
        (dict(rank=4, alpha=1.0, dropout=1.5), r"dropout must be a number in \[0, 1\], got 1.5"),
        (dict(rank=4, alpha=1.0, dropout=-0.1), "got -0.1"),
        (dict(rank=4, alpha=1.0, dropout=float("nan")), "got nan"),
        (dict(rank=4, alpha=1.0, rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]: rank must be"),
        (dict(rank=4, alpha=1.0, alpha_pattern={"v": -2}), r"alpha_pattern\['v'\]: alpha must be"),
        (dict(rank=4, alpha=1.0, rank_pattern={"(": 2}), "not a valid regular expression"),
        (dict(rank=4, alpha=1.0, target_modules=[1]), "target_modules must hold strings"),
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
        (dict(dropout="0.1"), "dropout must be a number"),
        (dict(dropout=10**400), "dropout must be a number"),
        (dict(alpha=10**400), "alpha must be a finite real number"),
        (dict(rank=2.0), "rank must be an integer"),
        (dict(rank=None), "rank must be an integer"),
    ],
)
def test_config_wrong_types_are_config_errors(kwargs, match):
    kwargs = dict(rank=4, alpha=1.0) | kwargs
    with pytest.raises(LoraConfigError, match=match) as info:
        LoraConfig(**kwargs)
    assert isinstance(info.value, ValueError)


def test_config_accepts_what_peft_writes():
    config = LoraConfig(rank=np.int64(4), alpha=np.float32(8), target_modules=None,
                        rank_pattern=None, alpha_pattern=None, use_rslora=np.bool_(True))
    assert (config.rank, config.alpha, config.target_modules) == (4, 8.0, ())
    assert config.rank_pattern == {} and config.use_rslora is True
    assert LoraConfig(rank=2, alpha=1, target_modules="q|v").target_modules == ("q|v",)
    assert LoraConfig(rank=2, alpha=1, target_modules=["q", "v"]).target_modules == ("q", "v")


def test_config_refused_validate_changes_nothing():
    config = LoraConfig(rank=4, alpha=8, rank_pattern={"q": 2})
    config.alpha = 16
    config.rank_pattern = [("q", 2)]
    with pytest.raises(LoraConfigError, match="rank_pattern"):
        config.validate()
    assert config.alpha == 16 and config.rank_pattern == [("q", 2)]


@pytest.mark.parametrize("copier", [copy.copy, copy.deepcopy, lambda c: pickle.loads(pickle.dumps(c))])
def test_config_pickles_and_copies(copier):
    config = LoraConfig(rank=4, alpha=8, dropout=0.1, target_modules=("q", "v"), fan_in_fan_out=True,
                        use_rslora=True, rank_pattern={"q": 2}, alpha_pattern={"v": 3.0})
    other = copier(config)
    assert other == config and other is not config
    if copier is not copy.copy:
        other.rank_pattern["k"] = 1
        assert "k" not in config.rank_pattern


def test_config_validate_after_change():
    config = LoraConfig(rank=4, alpha=8)
    config.dropout = 2.0
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
    config = LoraConfig(rank=8, alpha=16, rank_pattern={"fc": 2}, alpha_pattern={"fc": 3.0})
    assert (config.rank_for("layers.0.fc"), config.alpha_for("layers.0.fc")) == (2, 3.0)
    assert (config.rank_for("layers.0.q"), config.alpha_for("layers.0.q")) == (8, 16.0)


# ----------------------------------------------------------------- adapter
def make_adapter(rng, dtype=np.float32, **config):
    adapter = LoraAdapter(LoraConfig(rank=config.pop("rank", 4), alpha=config.pop("alpha", 8), **config))
    for name, shape in (("layers.0.q_proj", (24, 16)), ("layers.0.v_proj", (16, 16)),
                        ("layers.1.fc", (32, 16))):
        layer = adapter.add_layer(name, rng.standard_normal(shape).astype(dtype), seed=1)
        layer.lora_b = rng.standard_normal((shape[0], layer.rank))
    return adapter


def test_totals_example():
    adapter = LoraAdapter(LoraConfig(rank=8, alpha=16))
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
    adapter = LoraAdapter(LoraConfig(rank=2, alpha=4, fan_in_fan_out=True))
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
        LoraAdapter(LoraConfig(rank=2, alpha=4)).save_peft(tmp_path)
