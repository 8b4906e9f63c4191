"""Decoding ratios: 1 to 8 rows through numba_lora against the dense product on the same W.

Cycles over several distinct 4096 x 4096 float32 layers (so W is read from
memory every call, as in a model), shuffles the order of the cases in each
round, and prints the median of each case over the dense product's median
(``W @ x`` for one row, ``X @ W.T`` for more), one line per run and row
count::

    python docs/bench/decode_ratios.py [--runs 5] [--rows 1 2 4 8] [--layers 4] [--rounds 60]
        [--shape 4096x4096] [--rank 16] [--dtype float32] [--nf4]

``--nf4`` times QLoraLinear instead (float32, blocksize 64) against its own
NF4 base product, the same kernel with the low-rank term skipped
(``scaling=0``): what the adapter costs on top of the 4-bit product.  An
NF4 layer is 9 MiB at 4096 x 4096, so give it ``--layers 8`` to keep the
working set out of a 32 MiB last-level cache.
"""

import argparse
import random
import time

import numpy as np

from numba_lora import LoraLinear, QLoraLinear, kernels


def _layers(m, n, rank, layers, dtype, nf4=False):
    rng = np.random.default_rng(0)
    stack = []
    for _ in range(layers):
        W = (rng.standard_normal((m, n)) / np.sqrt(n)).astype(dtype)
        layer = (QLoraLinear if nf4 else LoraLinear)(W, rank, 2.0 * rank, seed=rng)
        layer.lora_b = rng.standard_normal((m, rank)) * 0.01
        stack.append(layer)
    return stack


def _nf4_cases(rows, n, m):
    """The NF4 base product (scaling 0) first: the others are timed against it."""
    from numba_lora.kernels import qlora

    rng = np.random.default_rng(1)
    X = rng.standard_normal((rows, n)).astype(np.float32)
    out = np.empty((rows, m), np.float32)

    def storage(L):
        q = L.quantized
        return q.packed, q.absmax, q.code, q.blocksize
    if rows == 1:
        x, y = X[0], out[0]
        return {
            "nf4 base": lambda L: qlora.forward_nf4(*storage(L), L._A, L._B, 0.0, x, y),
            "kernels.forward_nf4": lambda L: qlora.forward_nf4(*storage(L), L._A, L._B,
                                                               L.scaling, x, y),
            "QLoraLinear.forward": lambda L: L.forward(x, out=y),
        }
    return {
        "nf4 base": lambda L: qlora.forward_batch_nf4(*storage(L), L._A, L._B, 0.0, X, out),
        "kernels.forward_batch_nf4": lambda L: qlora.forward_batch_nf4(*storage(L), L._A, L._B,
                                                                       L.scaling, X, out),
        "QLoraLinear.forward_batch": lambda L: L.forward_batch(X, out=out),
    }


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
    m, n = stack[0].out_features, stack[0].in_features
    if isinstance(stack[0], QLoraLinear):
        cases = _nf4_cases(rows, n, m)
    else:
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
    reference = next(iter(cases))
    base = np.median(times[reference])
    return reference, base, {k: np.median(v) / base for k, v in times.items() if k != reference}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--shape", default="4096x4096")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--nf4", action="store_true", help="QLoraLinear against its NF4 base product")
    args = p.parse_args()
    if args.nf4 and args.dtype != "float32":
        p.error("--nf4 is float32 only")
    m, n = (int(v) for v in args.shape.split("x"))
    stack = _layers(m, n, args.rank, args.layers, np.dtype(args.dtype), args.nf4)
    for k in range(args.runs):
        for rows in args.rows:
            reference, base, ratios = run(stack, rows,
                                          args.rounds if rows == 1 else args.rounds // 3, seed=k)
            print(f"rows {rows}  {reference} {base * 1e3:.3f} ms  " +
                  "  ".join(f"{name} {r:.3f}x" for name, r in ratios.items()), flush=True)


if __name__ == "__main__":
    main()
