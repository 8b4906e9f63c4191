"""Decoding ratios: 1 to 8 rows through numba_lora against the dense product on the same W.

Cycles over several distinct 4096 x 4096 float32 layers (so W is read from
memory every call, as in a model), shuffles the order of the cases in each
round, and prints the median of each case over the dense product's median
(``W @ x`` for one row, ``X @ W.T`` for more), one line per run and row
count::

    python docs/bench/decode_ratios.py [--runs 5] [--rows 1 2 4 8] [--layers 4] [--rounds 60]
        [--shape 4096x4096] [--rank 16] [--dtype float32]
"""

import argparse
import random
import time

import numpy as np

from numba_lora import LoraLinear, kernels


def _layers(m, n, rank, layers, dtype):
    rng = np.random.default_rng(0)
    stack = []
    for _ in range(layers):
        W = (rng.standard_normal((m, n)) / np.sqrt(n)).astype(dtype)
        layer = LoraLinear(W, rank, 2.0 * rank, seed=rng)
        layer.lora_b = rng.standard_normal((m, rank)) * 0.01
        stack.append(layer)
    return stack


def _cases(rows, n, m, dtype):
    rng = np.random.default_rng(1)
    if rows == 1:
        x = rng.standard_normal(n).astype(dtype)
        out = np.empty(m, dtype)
        return {
            "dense": lambda L: np.matmul(L.weight, x, out=out),
            "kernels.forward": lambda L: kernels.forward(L.weight, L.lora_a, L.lora_b,
                                                         L.scaling, x, out),
            "kernels.forward_stacked": lambda L: kernels.forward_stacked(
                L._WA, L.lora_b, L.scaling, x, out),
            "LoraLinear.forward": lambda L: L.forward(x, out=out),
        }
    X = rng.standard_normal((rows, n)).astype(dtype)
    out = np.empty((rows, m), dtype)
    return {
        "dense": lambda L: np.matmul(X, L.weight.T, out=out),
        "kernels.forward_batch": lambda L: kernels.forward_batch(L.weight, L.lora_a, L.lora_b,
                                                                 L.scaling, X, out),
        "LoraLinear.forward_batch": lambda L: L.forward_batch(X, out=out),
    }


def run(stack, rows, rounds, seed):
    m, n = stack[0].weight.shape
    cases = _cases(rows, n, m, stack[0].dtype)
    for call in cases.values():
        for layer in stack:
            call(layer)
    times = {k: [] for k in cases}
    keys = list(cases)
    order = random.Random(seed)
    for _ in range(rounds):
        order.shuffle(keys)
        for k in keys:
            for layer in stack:
                t = time.perf_counter()
                cases[k](layer)
                times[k].append(time.perf_counter() - t)
    dense = np.median(times["dense"])
    return dense, {k: np.median(v) / dense for k, v in times.items() if k != "dense"}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--shape", default="4096x4096")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = p.parse_args()
    m, n = (int(v) for v in args.shape.split("x"))
    stack = _layers(m, n, args.rank, args.layers, np.dtype(args.dtype))
    for k in range(args.runs):
        for rows in args.rows:
            dense, ratios = run(stack, rows, args.rounds if rows == 1 else args.rounds // 3, seed=k)
            print(f"rows {rows}  dense {dense * 1e3:.3f} ms  " +
                  "  ".join(f"{name} {r:.3f}x" for name, r in ratios.items()), flush=True)


if __name__ == "__main__":
    main()
