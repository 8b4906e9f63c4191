"""How-to: load a PEFT adapter (no torch), run it, save it back."""
import os
import tempfile

import numpy as np

from _files import make_adapter, make_base_model  # tiny stand-ins for real files
from numba_lora import LoraAdapter

tmp = tempfile.mkdtemp()
# model.safetensors + config.json, and PEFT's two files:
base_dir = make_base_model(os.path.join(tmp, "base-model"))
adapter_dir = make_adapter(os.path.join(tmp, "my-adapter"), base_dir)

# The base weights come from the model's own files (a directory, its
# model.safetensors, or a sharded checkpoint's index); only the adapted
# tensors are read.
adapter = LoraAdapter.from_peft(adapter_dir, base_dir)
print(adapter.summary())

name = "model.layers.0.self_attn.q_proj"
layer = adapter[name]                                 # a LoraLinear
x = np.random.default_rng(0).standard_normal(layer.in_features)
y = adapter.forward_layer(name, x)                    # W x + scaling B (A x)
Y = adapter.forward_batch_layer(name, np.stack([x, x]))
assert np.allclose(Y[0], y, rtol=1e-5, atol=1e-5)

with adapter.disable_adapter():                       # the base model alone, as PEFT's
    y_base = adapter.forward_layer(name, x)
assert np.allclose(y_base, layer.weight @ x, rtol=1e-4, atol=1e-4)

adapter.merge_all(check_finite=True)                  # every W += scaling B A
adapter.unmerge_all()

# PEFT's names and the base model's name travel with it, so PEFT's
# AutoPeftModel... loaders find the base.
config = adapter.config
print(config.r, config.lora_alpha, config.base_model_name_or_path)
adapter.save_peft(os.path.join(tmp, "my-adapter-copy"))
print(sorted(os.listdir(os.path.join(tmp, "my-adapter-copy"))))
