"""Draw ``docs/_static/training_loss.png`` for the training page.

Usage (from the repository root; needs matplotlib, ``pip install ".[docs]"``)::

    python docs/make_training_plot.py

Left: the loss of ``examples/train_mlp.py`` (its default settings) falling,
per mini-batch step and per epoch on the training and test sets.  Right: the
20-step run of ``tests/fixtures/train/mlp_default_float32.npz`` redone with
numba_lora's training API beside PEFT's own loss curve from the fixture
(torch 2.13, PEFT 0.21.2).  Prints the largest relative difference between
the two curves, which the page quotes.
"""

import sys
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from train_mlp import train_demo  # noqa: E402

from numba_lora import LoraAdapter, LoraConfig  # noqa: E402
from numba_lora.optim import AdamW  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "train" / "mlp_default_float32.npz"
OUT = Path(__file__).resolve().parent / "_static" / "training_loss.png"


def peft_run_here(d):
    """The fixture's PEFT run (full batch, AdamW lr 1e-2) through numba_lora's API."""
    adapter = LoraAdapter(LoraConfig(r=int(d["rank"]), lora_alpha=float(d["alpha"]),
                                     target_modules=["fc1", "fc2"]))
    for name in ("fc1", "fc2"):
        layer = adapter.add_layer(name, d[f"{name}_weight"])
        layer.lora_a, layer.lora_b = d[f"{name}.A0"], d[f"{name}.B0"]
    fc1, fc2 = adapter["fc1"], adapter["fc2"]
    opt = AdamW(adapter, lr=float(d["lr"]))
    losses = []
    for _ in range(int(d["steps"])):
        z, c1 = fc1.forward_train(d["X"])
        z += d["fc1_bias"]
        h = np.maximum(z, 0)
        y, c2 = fc2.forward_train(h)
        y += d["fc2_bias"]
        diff = y - d["T"]
        losses.append(float(np.mean(diff * diff)))
        dh = fc2.backward(diff * np.float32(2.0 / diff.size), c2)
        fc1.backward(dh * (z > 0), c1, input_grad=False)
        opt.step()
        opt.zero_grad()
    return np.array(losses)


def main():
    demo = train_demo(verbose=False)
    with np.load(FIXTURE) as data:
        d = {k: data[k] for k in data.files}
    ours = peft_run_here(d)
    worst = float(np.max(np.abs(ours / d["loss"] - 1)))
    print(f"example: test loss {demo['test_loss'][0]:.4f} -> {demo['test_loss'][-1]:.4f}")
    print(f"PEFT run: largest relative difference of the loss curves {worst:.1e}")

    fig, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.2), dpi=90)
    steps = np.arange(1, len(demo["step_loss"]) + 1)
    per_epoch = len(steps) // (len(demo["train_loss"]) - 1)
    epochs = np.arange(len(demo["train_loss"])) * per_epoch
    left.plot(steps, demo["step_loss"], color="0.75", lw=0.8, label="mini-batch")
    left.plot(epochs, demo["train_loss"], "o-", ms=3, lw=1.2, label="train set")
    left.plot(epochs, demo["test_loss"], "s-", ms=3, lw=1.2, label="test set")
    left.set_yscale("log")
    left.yaxis.set_major_locator(matplotlib.ticker.FixedLocator([0.02, 0.05, 0.1, 0.2, 0.5]))
    left.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    left.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set_xlabel("AdamW step")
    left.set_ylabel("MSE loss")
    left.set_title("examples/train_mlp.py (rank 4, float32)", fontsize=9)
    left.legend(fontsize=8, frameon=False)

    x = np.arange(1, len(ours) + 1)
    right.plot(x, d["loss"], "o", ms=6, mfc="none", label="PEFT 0.21.2 / torch 2.13")
    right.plot(x, ours, "-", lw=1.2, label="numba_lora")
    right.set_xlabel("AdamW step (full batch)")
    right.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    right.set_title(f"PEFT's run redone here: loss within {worst:.0e} relative", fontsize=9)
    right.legend(fontsize=8, frameon=False)
    for ax in (left, right):
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3, lw=0.5)
    fig.tight_layout()
    OUT.parent.mkdir(exist_ok=True)
    fig.savefig(OUT, dpi=90, metadata={"Software": None})
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
