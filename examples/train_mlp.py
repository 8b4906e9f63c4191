"""Fine-tune a LoRA adapter on a small NumPy MLP, on the CPU, and save it for PEFT.

The "pretrained" model is two linear layers with a ReLU between them,
``fc1: 16 -> 64`` and ``fc2: 64 -> 4`` (plain NumPy arrays: weights and
biases).  The task is a regression whose targets come from a slightly
different MLP (both weights moved by a rank-2 change), so the base model
misses them and a rank-4 adapter on both layers can learn the difference.
Only the LoRA factors train; W and the biases stay frozen.

Run it::

    python examples/train_mlp.py                  # prints the loss, saves ./train_mlp_adapter/
    python examples/train_mlp.py --out my-adapter --epochs 30

or call :func:`train_demo` from Python.  PEFT loads the saved directory onto
the same base weights (``PeftModel.from_pretrained``).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from numba_lora import LoraAdapter, LoraConfig
from numba_lora.optim import AdamW, clip_grad_norm

IN, HIDDEN, OUT = 16, 64, 4


def make_problem(seed=0, n_train=512, n_test=256, dtype=np.float32):
    """Base MLP weights and a regression data set the base model does not fit.

    Returns
    -------
    base : dict of ndarray
        ``fc1_weight`` (64, 16), ``fc1_bias`` (64,), ``fc2_weight`` (4, 64),
        ``fc2_bias`` (4,).
    (X_train, T_train), (X_test, T_test) : ndarray
        Inputs (n, 16) and targets (n, 4).
    """
    rng = np.random.default_rng(seed)
    base = {
        "fc1_weight": rng.standard_normal((HIDDEN, IN)) / np.sqrt(IN),
        "fc1_bias": 0.1 * rng.standard_normal(HIDDEN),
        "fc2_weight": rng.standard_normal((OUT, HIDDEN)) / np.sqrt(HIDDEN),
        "fc2_bias": 0.1 * rng.standard_normal(OUT),
    }
    # The "fine-tuning task": the same network with rank-2 changes to its weights.
    teacher1 = base["fc1_weight"] + 0.6 * (rng.standard_normal((HIDDEN, 2))
                                           @ rng.standard_normal((2, IN))) / np.sqrt(IN)
    teacher2 = base["fc2_weight"] + 0.6 * (rng.standard_normal((OUT, 2))
                                           @ rng.standard_normal((2, HIDDEN))) / np.sqrt(HIDDEN)

    def data(n):
        X = rng.standard_normal((n, IN))
        T = np.maximum(X @ teacher1.T + base["fc1_bias"], 0) @ teacher2.T + base["fc2_bias"]
        return X.astype(dtype), (T + 0.01 * rng.standard_normal(T.shape)).astype(dtype)

    base = {k: v.astype(dtype) for k, v in base.items()}
    return base, data(n_train), data(n_test)


def mlp_forward(adapter, base, X):
    """Inference: ``fc2(relu(fc1(X)))`` through the adapter's layers (eval mode: no dropout)."""
    H = np.maximum(adapter.forward_batch_layer("fc1", X) + base["fc1_bias"], 0)
    return adapter.forward_batch_layer("fc2", H) + base["fc2_bias"]


def mse(Y, T):
    diff = Y - T
    return float(np.mean(diff * diff))


def train_demo(epochs=20, batch_size=64, lr=1e-2, rank=4, alpha=8.0, dropout=0.05,
               max_norm=1.0, seed=0, out_dir=None, verbose=True):
    """Fine-tune a rank-``rank`` adapter on both layers of the demo MLP with AdamW.

    Parameters
    ----------
    epochs : int
        Passes over the 512 training rows, in shuffled mini-batches of ``batch_size``.
    lr : float
        AdamW's learning rate (other settings torch's defaults).
    rank, alpha, dropout : int, float, float
        The adapter's ``r``, ``lora_alpha`` and ``lora_dropout``.
    max_norm : float or None
        Clip the global gradient norm to this before each step (None: no clipping).
    seed : int
        Seeds the problem, the factors' initialisation, the shuffling and dropout.
    out_dir : str or os.PathLike or None
        Where to save the trained adapter in PEFT's format (None: not saved).
    verbose : bool
        Print the losses as training goes.

    Returns
    -------
    dict
        ``adapter`` (the trained :class:`~numba_lora.LoraAdapter`), ``base``
        (the frozen base weights and biases), ``step_loss`` (each step's
        mini-batch loss), ``train_loss`` and ``test_loss`` (full-set losses
        before training and after each epoch).
    """
    base, (X, T), (X_test, T_test) = make_problem(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=["fc1", "fc2"])
    adapter = LoraAdapter(config)
    rng = np.random.default_rng(seed + 1)
    for name in ("fc1", "fc2"):
        adapter.add_layer(name, base[f"{name}_weight"], seed=rng)  # PEFT's init: B = 0
    fc1, fc2 = adapter["fc1"], adapter["fc2"]
    opt = AdamW(adapter, lr=lr)

    step_loss = []
    train_loss = [mse(mlp_forward(adapter, base, X), T)]
    test_loss = [mse(mlp_forward(adapter, base, X_test), T_test)]
    if verbose:
        print(f"adapter: {adapter.summary()}")
        print(f"before training: train loss {train_loss[0]:.4f}, test loss {test_loss[0]:.4f}")
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(X))
        for start in range(0, len(X), batch_size):
            rows = order[start:start + batch_size]
            xb, tb = X[rows], T[rows]
            # Forward: each layer keeps what its backward needs in a context.
            z, ctx1 = fc1.forward_train(xb, dropout=config.lora_dropout, rng=rng)
            z += base["fc1_bias"]
            h = np.maximum(z, 0)
            y, ctx2 = fc2.forward_train(h, dropout=config.lora_dropout, rng=rng)
            y += base["fc2_bias"]
            step_loss.append(mse(y, tb))
            # Backward: d mean((y - t)^2) / dy, then layer by layer, top down.
            dy = (y - tb) * np.float32(2.0 / y.size)
            dh = fc2.backward(dy, ctx2)                        # dX for the layer below
            fc1.backward(dh * (z > 0), ctx1, input_grad=False)  # first layer: no dX needed
            if max_norm is not None:
                clip_grad_norm(adapter, max_norm)
            opt.step()
            opt.zero_grad()
        train_loss.append(mse(mlp_forward(adapter, base, X), T))
        test_loss.append(mse(mlp_forward(adapter, base, X_test), T_test))
        if verbose:
            print(f"epoch {epoch:3d}: train loss {train_loss[-1]:.4f}, "
                  f"test loss {test_loss[-1]:.4f}")
    if out_dir is not None:
        adapter.save_peft(out_dir)
        if verbose:
            print(f"saved the adapter for PEFT in {out_dir}")
    return dict(adapter=adapter, base=base, step_loss=np.array(step_loss),
                train_loss=np.array(train_loss), test_loss=np.array(test_loss))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="train_mlp_adapter",
                        help="directory for the PEFT adapter ('' to skip saving)")
    args = parser.parse_args(argv)
    result = train_demo(epochs=args.epochs, lr=args.lr, rank=args.rank, seed=args.seed,
                        out_dir=args.out or None)
    return 0 if result["test_loss"][-1] < result["test_loss"][0] else 1


if __name__ == "__main__":
    sys.exit(main())
