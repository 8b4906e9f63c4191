"""How-to: keep a base weight in 4-bit NF4 (QLoRA) and run a LoRA adapter over it."""
import numpy as np

from numba_lora import LoraLinear, nf4
from numba_lora.qlora import QLoraLinear

rng = np.random.default_rng(0)
out_features, in_features, rank = 256, 512, 8
W = rng.standard_normal((out_features, in_features), dtype=np.float32) / 20

# QLoraLinear quantizes W as bitsandbytes does (NF4, 64 weights per scale)
# and keeps only the 4-bit codes and the scales: no float copy of W.
layer = QLoraLinear(W, rank=rank, alpha=16.0, seed=0)
layer.lora_b = 0.01 * rng.standard_normal((out_features, rank))
print(f"{layer.nbytes / W.nbytes:.3f}x the bytes of the float32 weight (with A and B)")

X = rng.standard_normal((16, in_features), dtype=np.float32)
Y = layer(X)                                              # (16, 256), float32

# It computes exactly what a float32 layer over the dequantized weight does.
W_q = nf4.dequantize(layer.quantized)                          # (256, 512), float32
dense = LoraLinear(W_q, rank=rank, alpha=16.0)
dense.lora_a, dense.lora_b = layer.lora_a, layer.lora_b
assert np.allclose(Y, dense(X), rtol=1e-5, atol=1e-5)

# The price is the rounding of each weight to the nearest of 16 levels
# (NF4_CODE, times its block's largest |w|): at most half the widest gap.
error = np.abs(W_q - W) / np.abs(W).max()
print(f"weight error: mean {error.mean():.4f}, largest {error.max():.3f} of max |W|")
assert error.max() <= np.diff(nf4.NF4_CODE).max() / 2 + 1e-6

# Double quantization also stores the scales in 8 bits (bitsandbytes' option).
q = nf4.quantize(W, blocksize=64, double_quant=True)
print(q, f"({q.nbytes / W.nbytes:.3f}x)")
assert q.nbytes < layer.quantized.nbytes
