"""Tiny stand-ins for a Hugging Face model directory and a PEFT adapter, for the how-tos.

A real model directory comes from ``huggingface_hub.snapshot_download`` and a
real adapter from PEFT's ``save_pretrained``; these are the same formats,
small enough to write in a blink.
"""
import json
import os

import numpy as np
from safetensors.numpy import save_file

from numba_lora import LoraAdapter, LoraConfig

HIDDEN, LAYERS = 64, 2
TARGETS = ("q_proj", "v_proj")


def module_names():
    return [f"model.layers.{i}.self_attn.{t}" for i in range(LAYERS) for t in TARGETS]


def make_base_model(directory, dtype=np.float32, seed=0):
    """A base model directory: model.safetensors and a config.json."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    tensors = {f"{name}.weight": rng.standard_normal((HIDDEN, HIDDEN)).astype(dtype)
               for name in module_names()}
    tensors["model.embed_tokens.weight"] = rng.standard_normal((100, HIDDEN)).astype(dtype)
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump({"model_type": "llama", "hidden_size": HIDDEN}, fh)
    return directory


def make_adapter(directory, base_directory, seed=1):
    """A PEFT LoRA adapter for the base model: adapter_config.json + adapter_model.safetensors."""
    rng = np.random.default_rng(seed)
    weights = base_weights(base_directory)
    adapter = LoraAdapter(LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS),
                                     base_model_name_or_path=os.fspath(base_directory),
                                     task_type="CAUSAL_LM"))
    for name in module_names():
        layer = adapter.add_layer(name, weights[f"{name}.weight"], seed=rng)
        layer.lora_b = 0.05 * rng.standard_normal((HIDDEN, 8))   # as if trained
    adapter.save_peft(directory)
    return directory


def base_weights(base_directory):
    from safetensors.numpy import load_file

    return load_file(os.path.join(base_directory, "model.safetensors"))
