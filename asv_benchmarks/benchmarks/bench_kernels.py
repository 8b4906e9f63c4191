"""asv benchmarks: every kernel beside the dense baseline on the same W.

Each class times numba_lora and the plain BLAS/NumPy call it must match, so
every figure reads as a ratio.  Compilation is warmed up in ``setup``.
Set ``NUMBA_LORA_ASV_SMALL=1`` for a small grid (CI's quick smoke run).
"""

import os
import sys
import textwrap

import numpy as np

from numba_lora import LoraLinear, kernels

SMALL = bool(os.environ.get("NUMBA_LORA_ASV_SMALL"))
SHAPES = ["256x512"] if SMALL else ["1024x1024", "4096x4096", "11008x4096"]
RANKS = [4, 16] if SMALL else [4, 16, 64]
DTYPES = ["float32", "float64"]
BATCHES = [8] if SMALL else [8, 64, 512]


def _arrays(shape, rank, dtype, seed=0):
    out_features, in_features = (int(v) for v in shape.split("x"))
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((out_features, in_features)) / np.sqrt(in_features)).astype(dtype)
    A = rng.uniform(-1, 1, (rank, in_features)).astype(dtype) / np.sqrt(in_features)
    B = (0.01 * rng.standard_normal((out_features, rank))).astype(dtype)
    return rng, W, A, B


class Forward:
    """One vector: numba_lora vs W @ x."""

    params = (SHAPES, RANKS, DTYPES)
    param_names = ["shape", "rank", "dtype"]

    def setup(self, shape, rank, dtype):
        rng, self.W, self.A, self.B = _arrays(shape, rank, dtype)
        self.x = rng.standard_normal(self.W.shape[1]).astype(dtype)
        self.out = np.empty(self.W.shape[0], dtype)
        kernels.forward(self.W, self.A, self.B, 2.0, self.x, self.out)
        np.matmul(self.W, self.x, out=self.out)

    def time_numba_lora(self, shape, rank, dtype):
        kernels.forward(self.W, self.A, self.B, 2.0, self.x, self.out)

    def time_dense(self, shape, rank, dtype):
        np.matmul(self.W, self.x, out=self.out)

    def time_numpy_composite(self, shape, rank, dtype):
        self.W @ self.x + 2.0 * (self.B @ (self.A @ self.x))

    def peakmem_numba_lora(self, shape, rank, dtype):
        kernels.forward(self.W, self.A, self.B, 2.0, self.x, self.out)


class ForwardBatch:
    """A batch of rows: numba_lora vs X @ W.T."""

    params = (SHAPES, RANKS, DTYPES, BATCHES)
    param_names = ["shape", "rank", "dtype", "batch"]

    def setup(self, shape, rank, dtype, batch):
        if shape == "11008x4096" and batch == 512 and dtype == "float64":
            raise NotImplementedError("too slow for a routine run")
        rng, self.W, self.A, self.B = _arrays(shape, rank, dtype)
        self.X = rng.standard_normal((batch, self.W.shape[1])).astype(dtype)
        self.out = np.empty((batch, self.W.shape[0]), dtype)
        kernels.forward_batch(self.W, self.A, self.B, 2.0, self.X, self.out)
        np.matmul(self.X, self.W.T, out=self.out)

    def time_numba_lora(self, shape, rank, dtype, batch):
        kernels.forward_batch(self.W, self.A, self.B, 2.0, self.X, self.out)

    def time_dense(self, shape, rank, dtype, batch):
        np.matmul(self.X, self.W.T, out=self.out)

    def time_numpy_composite(self, shape, rank, dtype, batch):
        self.X @ self.W.T + 2.0 * ((self.X @ self.A.T) @ self.B.T)

    def peakmem_numba_lora(self, shape, rank, dtype, batch):
        kernels.forward_batch(self.W, self.A, self.B, 2.0, self.X, self.out)


class Merge:
    """In-place merge and unmerge vs one copy of W (the least an update can cost)."""

    params = (SHAPES, RANKS, DTYPES)
    param_names = ["shape", "rank", "dtype"]

    def setup(self, shape, rank, dtype):
        _, self.W, self.A, self.B = _arrays(shape, rank, dtype)
        self.W2 = np.empty_like(self.W)
        kernels.merge(self.W, self.A, self.B, 2.0)
        kernels.unmerge(self.W, self.A, self.B, 2.0)
        kernels.count_nonfinite_merged(self.W, self.A, self.B, 2.0)

    def time_merge_unmerge(self, shape, rank, dtype):
        kernels.merge(self.W, self.A, self.B, 2.0)
        kernels.unmerge(self.W, self.A, self.B, 2.0)

    def time_copy_twice(self, shape, rank, dtype):
        np.copyto(self.W2, self.W)
        np.copyto(self.W2, self.W)

    def time_numpy_merge_unmerge(self, shape, rank, dtype):
        self.W += 2.0 * (self.B @ self.A)
        self.W -= 2.0 * (self.B @ self.A)

    def time_count_nonfinite_merged(self, shape, rank, dtype):
        kernels.count_nonfinite_merged(self.W, self.A, self.B, 2.0)

    def peakmem_merge_unmerge(self, shape, rank, dtype):
        kernels.merge(self.W, self.A, self.B, 2.0)
        kernels.unmerge(self.W, self.A, self.B, 2.0)

    def peakmem_numpy_merge_unmerge(self, shape, rank, dtype):
        self.W += 2.0 * (self.B @ self.A)
        self.W -= 2.0 * (self.B @ self.A)

    def peakmem_copy_twice(self, shape, rank, dtype):
        np.copyto(self.W2, self.W)
        np.copyto(self.W2, self.W)


class Layer:
    """The LoraLinear methods users call (validation included)."""

    params = (["1024x1024"] if not SMALL else SHAPES,)
    param_names = ["shape"]

    def setup(self, shape):
        rng, W, _, B = _arrays(shape, 16, "float32")
        self.layer = LoraLinear(W, 16, 32.0, seed=0)
        self.layer.lora_b = B
        self.x = rng.standard_normal(W.shape[1]).astype(np.float32)
        self.out = np.empty(W.shape[0], np.float32)
        self.layer.forward(self.x, out=self.out)

    def time_forward(self, shape):
        self.layer.forward(self.x, out=self.out)


class ColdStart:
    """A fresh interpreter: import numba_lora and run the first forward (warm cache)."""

    def setup_cache(self):
        # Fill the package's Numba cache so the timed run loads, not compiles.
        import subprocess

        subprocess.run([sys.executable, "-c", self.code], check=True)

    code = textwrap.dedent("""
        import numpy as np, numba_lora
        layer = numba_lora.LoraLinear(np.ones((256, 256), np.float32), 8, 16.0, seed=0)
        layer.forward(np.ones(256, np.float32))
    """)

    def timeraw_import_and_first_forward(self):
        return self.code


class MultiAdapter:
    """Many adapters in one batch vs one adapter on the same rows (and NumPy's loop)."""

    params = (["256x512"] if SMALL else ["4096x4096"], [16], ["float32"],
              ["mixed_512x8", "per_row_64x64"])
    param_names = ["shape", "rank", "dtype", "case"]

    def setup(self, shape, rank, dtype, case):
        from numba_lora import MultiLoraLinear

        rows, n_adapters = {"mixed_512x8": (512, 8), "per_row_64x64": (64, 64)}[case]
        rng, self.W, A, B = _arrays(shape, rank, dtype)
        self.multi = MultiLoraLinear(self.W)
        self.factors = []
        for i in range(n_adapters):
            Ai = rng.uniform(-1, 1, A.shape).astype(dtype) / np.sqrt(A.shape[1])
            Bi = (0.01 * rng.standard_normal(B.shape)).astype(dtype)
            self.multi.add_adapter(f"a{i}", Ai, Bi, 32.0)
            self.factors.append((Ai, Bi, 32.0 / rank))
        self.single = LoraLinear(self.W, rank, 32.0, seed=0)
        self.single.lora_b = B
        self.ids = np.arange(rows) % n_adapters
        self.X = rng.standard_normal((rows, self.W.shape[1])).astype(dtype)
        self.out = np.empty((rows, self.W.shape[0]), dtype)
        self.multi.forward_batch(self.X, self.ids, out=self.out)
        self.single.forward_batch(self.X, out=self.out)

    def time_multi(self, shape, rank, dtype, case):
        self.multi.forward_batch(self.X, self.ids, out=self.out)

    def time_single_adapter(self, shape, rank, dtype, case):
        self.single.forward_batch(self.X, out=self.out)

    def time_numpy_loop(self, shape, rank, dtype, case):
        Y = self.X @ self.W.T
        for i, (A, B, s) in enumerate(self.factors):
            rows = np.flatnonzero(self.ids == i)
            if rows.size:
                Y[rows] += s * ((self.X[rows] @ A.T) @ B.T)

    def peakmem_multi(self, shape, rank, dtype, case):
        self.multi.forward_batch(self.X, self.ids, out=self.out)
