"""asv benchmarks: every kernel beside the dense baseline on the same W.

Each suite times three calls on the same arrays, so every figure reads as a
ratio: ``time_numba_lora`` (numba_lora), ``time_dense`` (the dense BLAS call
or copy it must match) and ``time_numpy_composite`` (what a NumPy user
writes), and the same three as ``peakmem_*``.  :class:`_Suite` holds the
shared grid, the arrays and the warm-up (compilation is not timed); a suite
only builds its inputs and names its three calls.

Set ``NUMBA_LORA_ASV_SMALL=1`` for a small grid (CI's quick smoke run).
"""

import os
import sys
import textwrap

import numpy as np

from numba_lora import LoraLinear, MultiLoraLinear, kernels

SMALL = bool(os.environ.get("NUMBA_LORA_ASV_SMALL"))
SHAPES = ["256x512"] if SMALL else ["1024x1024", "4096x4096", "11008x4096"]
RANKS = [4, 16] if SMALL else [4, 16, 64]
DTYPES = ["float32", "float64"]
BATCHES = [8] if SMALL else [8, 64, 512]
SCALING = 2.0


def _arrays(shape, rank, dtype, seed=0):
    out_features, in_features = (int(v) for v in shape.split("x"))
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((out_features, in_features)) / np.sqrt(in_features)).astype(dtype)
    # Divide before the cast: float32 / np.float64 is float64 under NumPy 2's promotion rules.
    A = (rng.uniform(-1, 1, (rank, in_features)) / np.sqrt(in_features)).astype(dtype)
    B = (0.01 * rng.standard_normal((out_features, rank))).astype(dtype)
    return rng, W, A, B


class _Suite:
    """Shared grid, arrays (``W``, ``A``, ``B``, ``rng``) and warm-up; asv skips it (``_``).

    A subclass builds its inputs in ``prepare`` (taking the parameters after
    shape, rank and dtype) and defines ``lora``, ``dense`` and ``numpy``.
    """

    params = (SHAPES, RANKS, DTYPES)
    param_names = ["shape", "rank", "dtype"]

    def setup(self, shape, rank, dtype, *extra):
        self.rng, self.W, self.A, self.B = _arrays(shape, rank, dtype)
        self.prepare(*extra)
        for call in (self.lora, self.dense, self.numpy):  # compilation, page faults
            call()

    def prepare(self, *extra):
        pass

    def time_numba_lora(self, *params):
        self.lora()

    def time_dense(self, *params):
        self.dense()

    def time_numpy_composite(self, *params):
        self.numpy()

    def peakmem_numba_lora(self, *params):
        self.lora()

    def peakmem_dense(self, *params):
        self.dense()

    def peakmem_numpy_composite(self, *params):
        self.numpy()


class Forward(_Suite):
    """One vector: ``kernels.forward`` vs ``W @ x``."""

    def prepare(self):
        self.x = self.rng.standard_normal(self.W.shape[1]).astype(self.W.dtype)
        self.out = np.empty(self.W.shape[0], self.W.dtype)

    def lora(self):
        kernels.forward(self.W, self.A, self.B, SCALING, self.x, self.out)

    def dense(self):
        np.matmul(self.W, self.x, out=self.out)

    def numpy(self):
        return self.W @ self.x + SCALING * (self.B @ (self.A @ self.x))


class ForwardBatch(_Suite):
    """A batch of rows: ``kernels.forward_batch`` vs ``X @ W.T``."""

    params = (SHAPES, RANKS, DTYPES, BATCHES)
    param_names = ["shape", "rank", "dtype", "batch"]

    def prepare(self, batch):
        if self.W.shape == (11008, 4096) and batch == 512 and self.W.dtype == np.float64:
            raise NotImplementedError("too slow for a routine run")
        self.X = self.rng.standard_normal((batch, self.W.shape[1])).astype(self.W.dtype)
        self.out = np.empty((batch, self.W.shape[0]), self.W.dtype)

    def lora(self):
        kernels.forward_batch(self.W, self.A, self.B, SCALING, self.X, self.out)

    def dense(self):
        np.matmul(self.X, self.W.T, out=self.out)

    def numpy(self):
        return self.X @ self.W.T + SCALING * ((self.X @ self.A.T) @ self.B.T)


class Merge(_Suite):
    """In-place merge and unmerge vs two copies of W (the least an update can cost)."""

    def prepare(self):
        self.W2 = np.empty_like(self.W)
        kernels.count_nonfinite_merged(self.W, self.A, self.B, SCALING)

    def lora(self):
        kernels.merge(self.W, self.A, self.B, SCALING)
        kernels.unmerge(self.W, self.A, self.B, SCALING)

    def dense(self):
        np.copyto(self.W2, self.W)
        np.copyto(self.W2, self.W)

    def numpy(self):
        self.W += SCALING * (self.B @ self.A)
        self.W -= SCALING * (self.B @ self.A)

    def time_count_nonfinite_merged(self, *params):
        kernels.count_nonfinite_merged(self.W, self.A, self.B, SCALING)


class Layer(Forward):
    """``LoraLinear.forward`` (validation included) vs the same kernel's baselines."""

    params = (SHAPES if SMALL else ["1024x1024"], [16], ["float32"])

    def prepare(self):
        super().prepare()
        self.layer = LoraLinear(self.W, self.A.shape[0], SCALING * self.A.shape[0], seed=0)
        self.layer.lora_a, self.layer.lora_b = self.A, self.B

    def lora(self):
        self.layer.forward(self.x, out=self.out)


class Decode(_Suite):
    """Decoding: ``LoraLinear`` on 1, 2, 4 and 8 rows vs the dense product.

    The layer's own path (one vector: ``kernels.forward``; up to 8 rows: the
    stacked ``[W; A]`` kernel) with its validation and lock, as a generation
    loop calls it once per token and layer.
    """

    params = (SHAPES if SMALL else ["4096x4096"], [16], ["float32"], [1, 2, 4, 8])
    param_names = ["shape", "rank", "dtype", "rows"]

    def prepare(self, rows):
        self.layer = LoraLinear(self.W, self.A.shape[0], SCALING * self.A.shape[0], seed=0)
        self.layer.lora_a, self.layer.lora_b = self.A, self.B
        shape = (self.W.shape[1],) if rows == 1 else (rows, self.W.shape[1])
        self.X = self.rng.standard_normal(shape).astype(self.W.dtype)
        self.out = np.empty(shape[:-1] + (self.W.shape[0],), self.W.dtype)

    def lora(self):
        if self.X.ndim == 1:
            self.layer.forward(self.X, out=self.out)
        else:
            self.layer.forward_batch(self.X, out=self.out)

    def dense(self):
        if self.X.ndim == 1:
            np.matmul(self.W, self.X, out=self.out)
        else:
            np.matmul(self.X, self.W.T, out=self.out)

    def numpy(self):
        return self.X @ self.W.T + SCALING * ((self.X @ self.A.T) @ self.B.T)


class MultiAdapter(_Suite):
    """Many adapters in one batch vs the dense product, one adapter, and NumPy's loop."""

    params = (["256x512"] if SMALL else ["4096x4096"], [16], ["float32"],
              ["mixed_512x8", "per_row_64x64"])
    param_names = ["shape", "rank", "dtype", "case"]

    def prepare(self, case):
        rows, n_adapters = {"mixed_512x8": (512, 8), "per_row_64x64": (64, 64)}[case]
        dtype, rank = self.W.dtype, self.A.shape[0]
        self.multi = MultiLoraLinear(self.W)
        self.factors = []
        for i in range(n_adapters):
            Ai = (self.rng.uniform(-1, 1, self.A.shape) / np.sqrt(self.A.shape[1])).astype(dtype)
            Bi = (0.01 * self.rng.standard_normal(self.B.shape)).astype(dtype)
            self.multi.add_adapter(f"a{i}", Ai, Bi, 32.0)
            self.factors.append((Ai, Bi, 32.0 / rank))
        self.single = LoraLinear(self.W, rank, 32.0, seed=0)
        self.single.lora_b = self.B
        self.ids = np.arange(rows) % n_adapters
        self.X = self.rng.standard_normal((rows, self.W.shape[1])).astype(dtype)
        self.out = np.empty((rows, self.W.shape[0]), dtype)
        self.single_adapter()

    def lora(self):
        self.multi.forward_batch(self.X, self.ids, out=self.out)

    def dense(self):
        np.matmul(self.X, self.W.T, out=self.out)

    def numpy(self):
        Y = self.X @ self.W.T
        for i, (A, B, s) in enumerate(self.factors):
            rows = np.flatnonzero(self.ids == i)
            if rows.size:
                Y[rows] += s * ((self.X[rows] @ A.T) @ B.T)
        return Y

    def single_adapter(self):
        self.single.forward_batch(self.X, out=self.out)

    def time_single_adapter(self, *params):
        self.single_adapter()


class ColdStart:
    """A fresh interpreter: import numba_lora and run the first forward (warm cache).

    The baseline: a fresh interpreter importing NumPy and running ``W @ x``.
    """

    code = textwrap.dedent("""
        import numpy as np, numba_lora
        layer = numba_lora.LoraLinear(np.ones((256, 256), np.float32), 8, 16.0, seed=0)
        layer.forward(np.ones(256, np.float32))
    """)
    dense_code = textwrap.dedent("""
        import numpy as np
        np.ones((256, 256), np.float32) @ np.ones(256, np.float32)
    """)

    def setup_cache(self):
        # Fill the package's Numba cache so the timed run loads, not compiles.
        import subprocess

        subprocess.run([sys.executable, "-c", self.code], check=True)

    def timeraw_import_and_first_forward(self):
        return self.code

    def timeraw_dense(self):
        return self.dense_code
