"""How-to: merge a PEFT adapter into a safetensors checkpoint, tensor by tensor."""
import os
import tempfile

import numpy as np
from safetensors.numpy import load_file

from _files import make_adapter, make_base_model  # tiny stand-ins for real files
from numba_lora import LoraAdapter, checkpoint

tmp = tempfile.mkdtemp()
base_dir = make_base_model(os.path.join(tmp, "base-model"))
adapter_dir = make_adapter(os.path.join(tmp, "my-adapter"), base_dir)
out_dir = os.path.join(tmp, "merged-model")

# Or on the command line: python -m numba_lora merge BASE ADAPTER OUT
result = checkpoint.merge(base_dir, adapter_dir, out_dir)
print(f"{len(result.merged)} tensors merged, {len(result.copied)} files copied")
print(sorted(os.listdir(out_dir)))

# Each merged tensor is what merging the layer in memory gives, bit for bit;
# every other tensor is copied as it is.
merged = load_file(os.path.join(out_dir, "model.safetensors"))
base = load_file(os.path.join(base_dir, "model.safetensors"))
adapter = LoraAdapter.from_peft(adapter_dir, base_dir)
adapter.merge_all()
for name, layer in adapter.items():
    assert np.array_equal(merged[f"{name}.weight"], layer.weight)
embed = "model.embed_tokens.weight"
assert np.array_equal(merged[embed], base[embed])
