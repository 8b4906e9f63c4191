"""merge/unmerge against np.copyto of W, interleaved, with nothing else running between.

    python docs/bench/merge_ratios.py [RANK ...]        (default: 4 16 64 256)

``python -m numba_lora bench`` times merge interleaved with NumPy's own
``W += s * (B @ A)``, whose multi-threaded gemm leaves OpenBLAS workers
spinning for ~0.1 s, so there merge shares a core with them (see
docs/kernels.rst, "Threads and BLAS").  This script shows the kernel on its
own: the copy, the merge and the unmerge, cycled over three distinct W
(4096 x 4096 float32, 64 MiB each: none stays in the 32 MiB L3).
"""

import sys
import time

import numpy as np

from numba_lora import kernels


def main(ranks):
    rng = np.random.default_rng(0)
    n = 4096
    Ws = [rng.standard_normal((n, n)).astype(np.float32) for _ in range(3)]
    dst = np.empty_like(Ws[0])
    for r in ranks:
        A = rng.standard_normal((r, n)).astype(np.float32)
        B = (rng.standard_normal((n, r)) * 1e-3).astype(np.float32)
        kernels.merge(Ws[0], A, B, 0.5)  # compile / load, warm up
        kernels.unmerge(Ws[0], A, B, 0.5)
        copy, merge, unmerge = [], [], []
        for it in range(9):
            W = Ws[it % 3]
            t = time.perf_counter()
            np.copyto(dst, W)
            copy.append(time.perf_counter() - t)
            t = time.perf_counter()
            kernels.merge(W, A, B, 0.5)
            merge.append(time.perf_counter() - t)
            t = time.perf_counter()
            kernels.unmerge(W, A, B, 0.5)
            unmerge.append(time.perf_counter() - t)
        c = np.median(copy)
        print(f"rank {r:4d}: copy {c * 1e3:6.2f} ms, merge {np.median(merge) / c:5.2f}x, "
              f"unmerge {np.median(unmerge) / c:5.2f}x", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [4, 16, 64, 256])
