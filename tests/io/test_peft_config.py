"""adapter_config.json round trips: every key PEFT wrote comes back; the base model is named.

The optional test at the end runs PEFT's own ``AutoPeftModelForCausalLM``
on a ``save_peft`` output, in a separate interpreter that has torch,
transformers and peft (``NUMBA_LORA_TORCH_PYTHON``, default
``/tmp/torchvenv/bin/python``); it is skipped where there is none.
"""

import json
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from numba_lora import LoraAdapter, LoraConfig, LoraConfigError, LoraUnsupportedError
from numba_lora.io.safetensors import open_weights, read_safetensors

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BASE = FIXTURES / "base_model.safetensors"

# Entries save_peft writes from the config and the layers, not as loaded.
OWNED = {"target_modules"}


def read_json(path):
    return json.loads(Path(path).read_text())


@pytest.mark.parametrize("name", ["peft_lora", "peft_rslora"])
def test_every_key_peft_wrote_is_written_back(tmp_path, name):
    original = read_json(FIXTURES / name / "adapter_config.json")
    adapter = LoraAdapter.from_peft(FIXTURES / name, BASE)
    adapter.save_peft(tmp_path)
    saved = read_json(tmp_path / "adapter_config.json")
    assert set(saved) == set(original)
    assert {k: v for k, v in saved.items() if k not in OWNED} == \
        {k: v for k, v in original.items() if k not in OWNED}
    # target_modules: the full names of the saved layers, which PEFT matches exactly.
    assert saved["target_modules"] == adapter.layer_names
    # And again: a second round trip changes nothing.
    LoraAdapter.from_peft(tmp_path, BASE).save_peft(tmp_path / "again")
    assert read_json(tmp_path / "again" / "adapter_config.json") == saved


def test_unknown_keys_survive_and_fields_are_updated(tmp_path):
    adapter = LoraAdapter.from_peft(FIXTURES / "peft_lora", BASE)
    adapter.config.extra["future_peft_option"] = {"nested": [1, 2]}
    adapter.config.base_model_name_or_path = "org/base-model"
    adapter.config.revision = "v1.0"
    adapter.config.task_type = "CAUSAL_LM"
    adapter.config.lora_dropout = 0.1
    adapter.save_peft(tmp_path)
    saved = read_json(tmp_path / "adapter_config.json")
    assert saved["future_peft_option"] == {"nested": [1, 2]}
    assert (saved["base_model_name_or_path"], saved["revision"], saved["task_type"],
            saved["lora_dropout"]) == ("org/base-model", "v1.0", "CAUSAL_LM", 0.1)
    loaded = LoraAdapter.from_peft(tmp_path, BASE).config
    assert (loaded.base_model_name_or_path, loaded.revision, loaded.task_type) == \
        ("org/base-model", "v1.0", "CAUSAL_LM")
    assert loaded.extra["future_peft_option"] == {"nested": [1, 2]}
    assert loaded.extra["peft_version"] == read_json(
        FIXTURES / "peft_lora" / "adapter_config.json")["peft_version"]


def test_a_new_adapter_writes_what_peft_needs(tmp_path, rng):
    adapter = LoraAdapter(LoraConfig(r=2, lora_alpha=4, task_type="CAUSAL_LM",
                                     base_model_name_or_path="org/base"))
    adapter.add_layer("model.layers.0.q_proj", rng.standard_normal((4, 3)))
    adapter.save_peft(tmp_path)
    saved = read_json(tmp_path / "adapter_config.json")
    assert saved["peft_type"] == "LORA" and saved["r"] == 2 and saved["lora_alpha"] == 4.0
    assert saved["base_model_name_or_path"] == "org/base" and saved["task_type"] == "CAUSAL_LM"
    assert saved["revision"] is None and saved["bias"] == "none" and saved["use_dora"] is False
    assert list(saved) == sorted(saved)  # as PEFT writes it


def test_save_refuses_extra_entries_that_would_not_load_back(tmp_path, rng):
    adapter = LoraAdapter(LoraConfig(r=1, lora_alpha=1, extra={"use_dora": True}))
    adapter.add_layer("q", rng.standard_normal((3, 3)))
    with pytest.raises(LoraUnsupportedError, match="config.extra sets use_dora=True"):
        adapter.save_peft(tmp_path / "a")
    adapter.config.extra = {"r": 3}
    with pytest.raises(LoraConfigError, match="extra must not hold 'r'"):
        adapter.save_peft(tmp_path / "a")
    assert not (tmp_path / "a").exists()


# ------------------------------------------------ PEFT's own loader (optional)
TORCH_PYTHON = os.environ.get("NUMBA_LORA_TORCH_PYTHON", "/tmp/torchvenv/bin/python")


def run_torch(script, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([TORCH_PYTHON, "-c", textwrap.dedent(script), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


MAKE_BASE = """
    import sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    # Small shards: the base is a sharded checkpoint with an index, as large models are.
    LlamaForCausalLM(config).save_pretrained(sys.argv[1], max_shard_size="4KB")
"""

LOAD_WITH_PEFT = """
    import sys, torch
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file, save_file
    model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]).eval()
    X = load_file(sys.argv[2])["X"]
    with torch.no_grad():
        q = model.base_model.model.model.layers[1].self_attn.q_proj
        save_file({"y": q(X).contiguous()}, sys.argv[3])
"""


@pytest.mark.skipif(not Path(TORCH_PYTHON).exists(), reason=f"no torch interpreter at {TORCH_PYTHON}")
def test_auto_peft_model_finds_the_base_named_by_save_peft(tmp_path, rng):
    from safetensors.numpy import save_file

    base, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    run_torch(MAKE_BASE, base)
    assert (base / "model.safetensors.index.json").is_file()
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        base_model_name_or_path=str(base), task_type="CAUSAL_LM")
    adapter = LoraAdapter(config)
    checkpoint = open_weights(base)  # the sharded checkpoint, read one tensor at a time
    for name in names:
        layer = adapter.add_layer(name, checkpoint.read(f"{name}.weight"), seed=1)
        layer.lora_b = 0.1 * rng.standard_normal(layer.lora_b.shape)
    adapter.save_peft(adapter_dir)

    X = rng.standard_normal((3, 16)).astype(np.float32)
    save_file({"X": X}, str(tmp_path / "x.safetensors"))
    run_torch(LOAD_WITH_PEFT, adapter_dir, tmp_path / "x.safetensors", tmp_path / "y.safetensors")
    y_peft = read_safetensors(tmp_path / "y.safetensors")["y"]
    y_ours = LoraAdapter.from_peft(adapter_dir, base).forward_batch_layer(names[2], X)
    np.testing.assert_allclose(y_ours, y_peft, rtol=1e-5, atol=1e-6)


def test_save_under_a_regular_file_is_a_config_error(tmp_path):
    adapter = LoraAdapter(LoraConfig(1, 1.0))
    adapter.add_layer("q", np.ones((2, 2)))
    (tmp_path / "file").write_text("x")
    for target in (tmp_path / "file", tmp_path / "file" / "sub", tmp_path / "file" / "a" / "b"):
        with pytest.raises(LoraConfigError, match="exists and is not a directory"):
            adapter.save_peft(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert (tmp_path / "file").read_text() == "x"
