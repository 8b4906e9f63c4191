"""How-to: merge an adapter into its weight for inference, and take it out again."""
import numpy as np

from numba_lora import LoraLinear, LoraNonFiniteError

rng = np.random.default_rng(0)
W = rng.standard_normal((256, 128), dtype=np.float32)
layer = LoraLinear(W, rank=8, alpha=16.0, seed=0)
layer.lora_b = 0.01 * rng.standard_normal((256, 8))
X = rng.standard_normal((16, 128), dtype=np.float32)

before = layer.forward_batch(X)
original = layer.weight.copy()

layer.merge()          # W += scaling * B @ A, in place: one dense product per call
assert layer.is_merged
assert np.allclose(layer.forward_batch(X), before, rtol=1e-4, atol=1e-4)

layer.unmerge()                    # W -= the very same delta
assert np.allclose(layer.weight, original, rtol=0, atol=1e-6)

# Cycles do not drift: the second cycle ends on the first cycle's bits.
layer.merge()
layer.unmerge()
after_one = layer.weight.copy()
layer.merge()
layer.unmerge()
assert np.array_equal(layer.weight, after_one)

# The base model alone for a block, merged or not, as PEFT's disable_adapter():
layer.merge()
with layer.disable_adapter():
    assert np.allclose(layer.forward_batch(X), X @ original.T, rtol=1e-4, atol=1e-4)
assert layer.is_merged                # and back as it was
layer.unmerge()

# check_finite=True refuses a merge that would overflow, W left bit for bit.
huge = LoraLinear(np.full((4, 4), 3e38, np.float32), rank=1, alpha=1.0, seed=0)
huge.lora_a = np.ones((1, 4))
huge.lora_b = np.full((4, 1), 1e38)    # 3e38 + 1e38 overflows float32
kept = huge.weight.copy()
try:
    huge.merge(check_finite=True)
    raise AssertionError("not refused")
except LoraNonFiniteError as exc:
    print("refused:", exc)
assert np.array_equal(huge.weight, kept) and not huge.is_merged
