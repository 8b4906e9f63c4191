"""Decoding ratios: one vector through numba_lora against the dense gemv on the same W.

Cycles over several distinct 4096 x 4096 float32 layers (so W is read from
memory every call, as in a model), shuffles the order of the cases in each
round, and prints the median of each case over the dense gemv's median, one
line per run::

    python docs/bench/decode_ratios.py [--runs 5] [--layers 4] [--rounds 60]
"""

import argparse
import random
import time

import numpy as np

from numba_lora import LoraLinear, kernels


def run(m, n, rank, layers, rounds, seed):
    rng = np.random.default_rng(0)
    stack = []
    for _ in range(layers):
        W = (rng.standard_normal((m, n)) / np.sqrt(n)).astype(np.float32)
        layer = LoraLinear(W, rank, 2.0 * rank, seed=rng)
        layer.lora_b = rng.standard_normal((m, rank)) * 0.01
        stack.append(layer)
    x = rng.standard_normal(n).astype(np.float32)
    out = np.empty(m, np.float32)
    cases = {
        "dense W@x": lambda L: np.matmul(L.weight, x, out=out),
        "kernels.forward": lambda L: kernels.forward(L.weight, L.lora_a, L.lora_b,
                                                     L.scaling, x, out),
        "LoraLinear.forward": lambda L: L.forward(x, out=out),
    }
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
    dense = np.median(times["dense W@x"])
    return dense, {k: np.median(v) / dense for k, v in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--shape", default="4096x4096")
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    m, n = (int(v) for v in args.shape.split("x"))
    for k in range(args.runs):
        dense, ratios = run(m, n, args.rank, args.layers, args.rounds, seed=k)
        print(f"dense {dense * 1e3:.3f} ms  " +
              "  ".join(f"{name} {r:.3f}x" for name, r in ratios.items() if name != "dense W@x"))


if __name__ == "__main__":
    main()
