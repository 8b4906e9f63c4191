"""How-to: apply a LoRA adapter to one linear layer."""
import numpy as np

from numba_lora import LoraLinear

rng = np.random.default_rng(0)
out_features, in_features, rank = 256, 128, 8

# The frozen base weight, (out_features, in_features), as a model stores it.
W = rng.standard_normal((out_features, in_features), dtype=np.float32)

# A fresh adapter: A drawn as PEFT draws it, B zero, scaling = alpha / rank.
layer = LoraLinear(W, rank=rank, alpha=16.0, seed=0)

# Trained factors go in by assignment; they are checked and copied.
layer.lora_b = 0.01 * rng.standard_normal((out_features, rank))

x = rng.standard_normal(in_features, dtype=np.float32)         # one vector
X = rng.standard_normal((32, in_features), dtype=np.float32)   # a batch of rows
y = layer(x)                                                   # (256,)
Y = layer.forward_batch(X)                                     # (32, 256)
H = layer(X.reshape(4, 8, in_features))                        # any leading shape

# The same as the formula, in float64:
A, B, s = (np.float64(v) for v in (layer.lora_a, layer.lora_b, layer.scaling))
expected = X @ W.T.astype(np.float64) + s * (X @ A.T) @ B.T
assert np.allclose(Y, expected, rtol=1e-4, atol=1e-4)
assert np.allclose(H.reshape(32, out_features), Y, rtol=1e-5, atol=1e-5)

# Preallocated output: no allocation per call.
out = np.empty((32, out_features), np.float32)
layer.forward_batch(X, out=out)

print(f"{layer.trainable_params} trainable parameters over {layer.total_params} "
      f"({layer.scaling=})")
