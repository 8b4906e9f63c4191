"""asv benchmarks for the NF4 base (QLoRA) and for training, each beside its dense baseline.

The same three calls as ``bench_kernels``: ``time_numba_lora``,
``time_dense`` (the float32 product on the same shape; for training the two
products ``X @ W.T`` and ``dY @ W``) and ``time_numpy_composite``.  The NF4
suite cycles over 4 distinct layers in every call, so the NF4 data (9 MiB at
4096 x 4096) is read from memory as the float32 W (64 MiB) is.

Set ``NUMBA_LORA_ASV_SMALL=1`` for a small grid (CI's quick smoke run).
"""

import os

import numpy as np

from numba_lora import AdamW, LoraLinear, QLoraLinear, nf4

SMALL = bool(os.environ.get("NUMBA_LORA_ASV_SMALL"))
SHAPES = ["256x512"] if SMALL else ["4096x4096"]
LAYERS = 4


def _shape(text):
    return tuple(int(v) for v in text.split("x"))


class QLoraForward:
    """``QLoraLinear`` forwards (NF4, blocksize 64, rank 16) vs the float32 product."""

    params = (SHAPES, [1, 8] if SMALL else [1, 8, 64, 512])
    param_names = ["shape", "batch"]

    def setup(self, shape, batch):
        out_features, in_features = _shape(shape)
        rng = np.random.default_rng(0)
        self.Ws, self.layers = [], []
        for _ in range(LAYERS):
            W = (rng.standard_normal((out_features, in_features))
                 / np.sqrt(in_features)).astype(np.float32)
            layer = QLoraLinear(W, 16, 32.0, seed=rng)
            layer.set_lora_b(0.01 * rng.standard_normal((out_features, 16)))
            self.Ws.append(W)
            self.layers.append(layer)
        shape_x = (in_features,) if batch == 1 else (batch, in_features)
        self.X = rng.standard_normal(shape_x).astype(np.float32)
        self.out = np.empty(shape_x[:-1] + (out_features,), np.float32)
        for call in (self.lora, self.dense):
            call()

    def lora(self):
        for layer in self.layers:
            if self.X.ndim == 1:
                layer.forward(self.X, out=self.out)
            else:
                layer.forward_batch(self.X, out=self.out)

    def dense(self):
        for W in self.Ws:
            np.matmul(W, self.X, out=self.out) if self.X.ndim == 1 else \
                np.matmul(self.X, W.T, out=self.out)

    def numpy(self):
        # bitsandbytes' CPU path: dequantize all of W, then the float32 product.
        for layer in self.layers:
            W = nf4.dequantize(layer.quantized)
            layer.lora_b @ (layer.lora_a @ self.X.T)
            self.X @ W.T

    def time_numba_lora(self, shape, batch):
        self.lora()

    def time_dense(self, shape, batch):
        self.dense()

    def time_numpy_composite(self, shape, batch):
        self.numpy()

    def peakmem_numba_lora(self, shape, batch):
        self.lora()


class Quantize:
    """``nf4.quantize`` of one weight (blocksize 64), plain and double quant, vs a copy of W."""

    params = (SHAPES, [False, True])
    param_names = ["shape", "double_quant"]

    def setup(self, shape, double_quant):
        rng = np.random.default_rng(0)
        self.W = rng.standard_normal(_shape(shape)).astype(np.float32)
        self.W2 = np.empty_like(self.W)
        nf4.quantize(self.W, 64, double_quant=double_quant)

    def time_quantize(self, shape, double_quant):
        nf4.quantize(self.W, 64, double_quant=double_quant)

    def time_copy(self, shape, double_quant):
        np.copyto(self.W2, self.W)


class Train:
    """``forward_train`` + ``backward`` (+ an AdamW step) vs ``X @ W.T`` and ``dY @ W``."""

    params = (SHAPES, [8] if SMALL else [64, 512], ["float32", "float64"])
    param_names = ["shape", "batch", "dtype"]

    def setup(self, shape, batch, dtype):
        out_features, in_features = _shape(shape)
        rng = np.random.default_rng(0)
        W = (rng.standard_normal((out_features, in_features)) / np.sqrt(in_features)).astype(dtype)
        self.layer = LoraLinear(W, 16, 32.0, seed=rng)
        self.layer.lora_b = 0.01 * rng.standard_normal((out_features, 16))
        self.opt = AdamW(self.layer, lr=1e-4)
        self.W = W
        self.X = rng.standard_normal((batch, in_features)).astype(dtype)
        self.dY = rng.standard_normal((batch, out_features)).astype(dtype)
        self.Y0 = np.empty((batch, out_features), dtype)
        self.dX0 = np.empty((batch, in_features), dtype)
        for call in (self.lora, self.dense, self.step):
            call()

    def lora(self):
        Y, ctx = self.layer.forward_train(self.X)
        self.layer.backward(self.dY, ctx)

    def dense(self):
        np.matmul(self.X, self.W.T, out=self.Y0)
        np.matmul(self.dY, self.W, out=self.dX0)

    def step(self):
        self.opt.step()

    def time_numba_lora(self, shape, batch, dtype):
        self.lora()

    def time_dense(self, shape, batch, dtype):
        self.dense()

    def time_adamw_step(self, shape, batch, dtype):
        self.step()
