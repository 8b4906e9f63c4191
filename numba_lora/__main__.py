"""``python -m numba_lora``: a short demo; ``python -m numba_lora bench``: the benchmark."""

import sys
import time

import numpy as np


def demo():
    """Build a layer, check it against NumPy, and time it against NumPy and dense BLAS."""
    t0 = time.perf_counter()
    from . import LoraLinear, __version__, bench

    out_features, in_features, rank, alpha = 4096, 4096, 16, 32.0
    print(f"numba_lora {__version__} demo: a {out_features}x{in_features} float32 layer, "
          f"rank {rank}, alpha {alpha:g}")
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((out_features, in_features)) / np.sqrt(in_features)).astype(np.float32)
    layer = LoraLinear(W, rank, alpha, seed=1)
    layer.lora_b = rng.standard_normal((out_features, rank)) * 0.01
    X = rng.standard_normal((64, in_features)).astype(np.float32)

    t = time.perf_counter()
    Y = layer(X)
    layer.merge()
    Y_merged = layer(X)
    layer.unmerge()
    print(f"import + first calls (compiling or loading cached kernels): "
          f"{time.perf_counter() - t0:.2f} s ({time.perf_counter() - t:.2f} s for the calls)")

    A, B = layer.lora_a.astype(np.float64), layer.lora_b.astype(np.float64)
    X64 = X.astype(np.float64)
    reference = X64 @ W.astype(np.float64).T + layer.scaling * (X64 @ A.T) @ B.T
    scale = np.abs(reference).max()
    print(f"forward_batch(64 rows) vs float64 NumPy: max error {np.abs(Y - reference).max() / scale:.1e} "
          f"(relative to max |y|); merged forward: {np.abs(Y_merged - reference).max() / scale:.1e}")
    print(f"after merge + unmerge, W differs from the original by at most "
          f"{np.abs(layer.weight - W).max():.1e}")
    print("\ntiming (medians, interleaved; ratios to the dense product on the same W):",
          flush=True)
    results = bench.run(batches=(1, 64), budget_s=0.5)
    print(bench.format_table(results))
    print("\nfull benchmark: python -m numba_lora bench --help")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from .bench import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print("usage: python -m numba_lora          run a short demo on default sizes\n"
              "       python -m numba_lora bench    benchmark (see 'bench --help')")
        return 0
    if argv:
        print(f"unknown command {argv[0]!r}; try 'python -m numba_lora --help'", file=sys.stderr)
        return 2
    return demo()


if __name__ == "__main__":
    sys.exit(main())
