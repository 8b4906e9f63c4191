"""How-to: serve many adapters over one base weight, each row with its own."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from numba_lora import LoraLinear, MultiLoraLinear

rng = np.random.default_rng(0)
out_features, in_features = 256, 128
W = rng.standard_normal((out_features, in_features), dtype=np.float32)

layer = MultiLoraLinear(W)                       # one copy of W for every adapter
factors = {}
for name, rank in (("support", 4), ("legal", 8), ("code", 16)):   # ranks may differ
    A = 0.1 * rng.standard_normal((rank, in_features))
    B = 0.1 * rng.standard_normal((out_features, rank))
    layer.add_adapter(name, A, B, alpha=2.0 * rank)
    factors[name] = (A, B, 2.0)                  # scaling = alpha / rank

# An adapter trained as a LoraLinear joins as it is.
tuned = LoraLinear(W, rank=4, alpha=8.0, seed=1)
tuned.lora_b = 0.1 * rng.standard_normal((out_features, 4))
layer.add_layer("tuned", tuned)
print(layer)

# Each row names its adapter (or None: the base weight alone).
X = rng.standard_normal((6, in_features), dtype=np.float32)
names = ["support", "code", None, "legal", "code", "tuned"]
Y = layer.forward_batch(X, names)                # (6, 256)
ids = [layer.adapter_names.index(n) if n else -1 for n in names]
# or by index, -1 for none:
assert np.array_equal(layer.forward_batch(X, np.array(ids)), Y)

for row, name in enumerate(names):
    expected = W @ X[row]
    if name in factors:
        A, B, s = factors[name]
        expected = expected + s * B @ (A @ X[row])
    elif name == "tuned":
        expected = tuned.forward(X[row])
    assert np.allclose(Y[row], expected, rtol=1e-4, atol=1e-3)

# Python threads may share one layer: there is no "active adapter" to race on.
batches = [rng.standard_normal((8, in_features), dtype=np.float32) for _ in range(4)]
with ThreadPoolExecutor(max_workers=2) as pool:
    outs = list(pool.map(lambda b: layer.forward_batch(b, ["code"] * 8), batches))
assert all(o.shape == (8, out_features) for o in outs)

layer.remove_adapter("legal")                    # later ids shift down by one
print(layer.adapter_names)
