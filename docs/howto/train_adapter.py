"""How-to: fine-tune a LoRA adapter with NumPy and numba_lora, and save it for PEFT."""
import tempfile

import numpy as np

from numba_lora import LoraAdapter, LoraConfig
from numba_lora.optim import AdamW, clip_grad_norm

rng = np.random.default_rng(0)
out_features, in_features, rank = 32, 48, 4

# A frozen base weight, and a task it does not do yet: targets made by a
# low-rank change of W, which a rank-4 adapter can learn.
W = rng.standard_normal((out_features, in_features), dtype=np.float32) / 7
U, V = rng.standard_normal((out_features, 2)), rng.standard_normal((2, in_features))
change = 0.3 * U @ V
X_all = rng.standard_normal((512, in_features), dtype=np.float32)
T_all = (X_all @ (W + change).T).astype(np.float32)

# An adapter with one layer, named as in the model PEFT will load it into.
config = LoraConfig(r=rank, lora_alpha=8, lora_dropout=0.05, target_modules=["proj"])
adapter = LoraAdapter(config)
layer = adapter.add_layer("model.proj", W, seed=0)    # A Kaiming-uniform, B = 0
opt = AdamW(adapter, lr=2e-2)                          # torch's AdamW, step for step


def loss_of(Y, T):
    return float(np.mean((Y.astype(np.float64) - T) ** 2))


first = loss_of(layer(X_all), T_all)
for epoch in range(15):
    for rows in np.array_split(rng.permutation(512), 8):  # mini-batches of 64
        X, T = X_all[rows], T_all[rows]
        Y, ctx = layer.forward_train(X, dropout=config.lora_dropout, rng=rng)
        dY = (Y - T) * np.float32(2.0 / Y.size)          # d mean((Y - T)^2) / dY
        layer.backward(dY, ctx, input_grad=False)         # fills grad_a, grad_b
        clip_grad_norm(adapter, max_norm=1.0)
        opt.step()
        opt.zero_grad()
last = loss_of(layer(X_all), T_all)
print(f"loss {first:.4f} -> {last:.4f}")
assert last < first / 4

# Saved in PEFT's format: PEFT's from_pretrained, or numba_lora, loads it.
out = tempfile.mkdtemp()
adapter.save_peft(out)
again = LoraAdapter.from_peft(out, {"model.proj": W})
assert np.array_equal(again["model.proj"].lora_b, layer.lora_b)
