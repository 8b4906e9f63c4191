"""Ratios of the NF4 forward kernels to NumPy's float32 product on the same shape.

Usage::

    python docs/bench/nf4_ratios.py [--out 4096] [--in 4096] [--blocksize 64]
        [--rank 16] [--rows 1 8 64 512] [--layers 4] [--repeats 15] [--dq] [--portable]

Every timing loop cycles over ``--layers`` distinct layers (each its own
float32 W and its own NF4 data), so neither the float32 W (64 MiB at
4096 x 4096) nor the NF4 data (9 MiB) is served from the last-level cache
by the previous call.  NF4 calls and NumPy calls are interleaved in bursts
(every layer once through one, then every layer once through the other),
and the table shows the median time per call of each, the ratio of the
medians, and the median of the first call of each burst on its own: that
call pays for the other library's threads still spinning on the cores
(OpenBLAS's workers spin for up to ~0.1 s after a product, Numba's OpenMP
workers for a while after a parallel loop), which on a 2-core machine can
cost more than the product itself.  ``--gap`` (default 0.2 s) sleeps before
each burst so that those threads are asleep; ``--gap 0`` shows the cost of
switching back to back.  Rows 1 is ``forward_nf4`` against ``W @ x``;
more rows are ``forward_batch_nf4`` against ``X @ W.T``.  The NF4 kernels
include the rank-``--rank`` LoRA term; NumPy's product does not (it is the
bare base product the targets are stated against).

The NF4 data is made here (nearest code, absmax per block), not bit-exact
bitsandbytes: the kernels' speed does not depend on the values.
"""

import argparse
import os
import time

import numpy as np


def quantize(W, blocksize, code):
    flat = W.ravel()
    n = flat.size
    nblocks = -(-n // blocksize)
    padded = np.zeros(nblocks * blocksize, np.float32)
    padded[:n] = flat
    blocks = padded.reshape(nblocks, blocksize)
    absmax = np.abs(blocks).max(axis=1).astype(np.float32)
    absmax[absmax == 0] = 1
    q = np.empty(blocks.shape, np.uint8)
    mids = (code[1:] + code[:-1]) / 2
    for b0 in range(0, nblocks, 4096):
        scaled = blocks[b0:b0 + 4096] / absmax[b0:b0 + 4096, None]
        q[b0:b0 + 4096] = np.searchsorted(mids, scaled)
    q = q.ravel()[:n]
    if n % 2:
        q = np.append(q, 0)
    return ((q[0::2] << 4) | q[1::2]).astype(np.uint8), absmax


def double_quant(absmax):
    """Stand-in double-quant state of the right shapes (for timing only)."""
    offset = np.float32(absmax.mean())
    centred = absmax - offset
    nested_code = np.linspace(-1, 1, 256).astype(np.float32)
    nb = -(-absmax.size // 256)
    padded = np.zeros(nb * 256, np.float32)
    padded[:absmax.size] = centred
    nested_absmax = np.abs(padded.reshape(nb, 256)).max(axis=1).astype(np.float32)
    nested_absmax[nested_absmax == 0] = 1
    scaled = padded.reshape(nb, 256) / nested_absmax[:, None]
    absmax_q = np.clip(np.round((scaled + 1) * 127.5), 0, 255).astype(np.uint8).ravel()
    return absmax_q[:absmax.size], nested_absmax, nested_code, offset


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=int, default=4096, dest="out_features")
    parser.add_argument("--in", type=int, default=4096, dest="in_features")
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 512])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15,
                        help="timed passes over all layers (median over passes x layers)")
    parser.add_argument("--gap", type=float, default=0.2,
                        help="seconds of sleep before each burst, so that the other library's "
                             "threads have stopped spinning (0: back to back)")
    parser.add_argument("--dq", action="store_true", help="time the double-quant kernels")
    parser.add_argument("--portable", action="store_true",
                        help="time the portable path, not the AVX-512 one")
    args = parser.parse_args()

    from numba_lora.kernels import qlora

    if args.layers < 4:
        parser.error("--layers must be >= 4 (the point is to defeat the last-level cache)")
    rng = np.random.default_rng(0)
    o, i, bs = args.out_features, args.in_features, args.blocksize
    layers = []
    for _ in range(args.layers):
        W = rng.standard_normal((o, i), dtype=np.float32)
        packed, absmax = quantize(W, bs, qlora.NF4_CODE)
        A = (rng.standard_normal((args.rank, i), dtype=np.float32) / np.sqrt(i)).astype(np.float32)
        B = rng.standard_normal((o, args.rank), dtype=np.float32)
        layers.append((W, packed, absmax, double_quant(absmax) if args.dq else None, A, B))
    scaling = np.float32(2.0)
    if args.portable:
        one, many = qlora._forward_nf4_portable, qlora._forward_batch_nf4_portable
        one_dq, many_dq = qlora._forward_nf4_dq_portable, qlora._forward_batch_nf4_dq_portable
    else:
        one, many = qlora.forward_nf4, qlora.forward_batch_nf4
        one_dq, many_dq = qlora.forward_nf4_dq, qlora.forward_batch_nf4_dq

    def nf4_call(layer, X, out):
        W, packed, absmax, dq, A, B = layer
        if X.ndim == 1:
            if dq is None:
                return one(packed, absmax, qlora.NF4_CODE, bs, A, B, scaling, X, out)
            return one_dq(packed, dq[0], dq[1], dq[2], dq[3], bs, A, B, scaling, X, out)
        if dq is None:
            return many(packed, absmax, qlora.NF4_CODE, bs, A, B, scaling, X, out)
        return many_dq(packed, dq[0], dq[1], dq[2], dq[3], bs, A, B, scaling, X, out)

    def dense_call(layer, X, out):
        W = layer[0]
        if X.ndim == 1:
            return np.matmul(W, X, out=out)
        return np.matmul(X, W.T, out=out)

    nf4_bytes = layers[0][1].nbytes + (layers[0][2].nbytes if not args.dq else
                                       sum(a.nbytes for a in layers[0][3][:3]))
    print(f"# {o} x {i}, blocksize {bs}, rank {args.rank}, {args.layers} layers cycled, "
          f"path {'portable' if args.portable else qlora.FAST_PATH}"
          f"{', double quant' if args.dq else ''}; NF4 bytes / float32 bytes = "
          f"{nf4_bytes / (4 * o * i):.4f}")
    print(f"# load before: {os.getloadavg()[0]:.2f}; gap {args.gap} s; Numba threads "
          f"{__import__('numba').get_num_threads()}")
    print(f"{'rows':>6} {'nf4 ms':>9} {'numpy ms':>9} {'ratio':>7} {'nf4 1st':>9} "
          f"{'numpy 1st':>9}")
    for rows in args.rows:
        X = (rng.standard_normal(i, dtype=np.float32) if rows == 1 else
             rng.standard_normal((rows, i), dtype=np.float32))
        out_n = np.empty(o if rows == 1 else (rows, o), np.float32)
        out_d = np.empty_like(out_n)
        for layer in layers:  # compile and warm up
            nf4_call(layer, X, out_n)
            dense_call(layer, X, out_d)
        t_n, t_d, first_n, first_d = [], [], [], []
        for _ in range(args.repeats):
            # Bursts: every layer once through the NF4 kernel, then every
            # layer once through NumPy.  The first call of a burst pays for
            # the other thread pool still spinning (see the module doc); it
            # is kept in the medians and also shown on its own.
            time.sleep(args.gap)
            for k, layer in enumerate(layers):
                t0 = time.perf_counter()
                nf4_call(layer, X, out_n)
                (first_n if k == 0 else t_n).append(time.perf_counter() - t0)
            time.sleep(args.gap)
            for k, layer in enumerate(layers):
                t0 = time.perf_counter()
                dense_call(layer, X, out_d)
                (first_d if k == 0 else t_d).append(time.perf_counter() - t0)
        mn, md = np.median(t_n + first_n), np.median(t_d + first_d)
        print(f"{rows:>6} {1e3 * mn:>9.3f} {1e3 * md:>9.3f} {mn / md:>7.3f} "
              f"{1e3 * np.median(first_n):>9.3f} {1e3 * np.median(first_d):>9.3f}")
    print(f"# load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
