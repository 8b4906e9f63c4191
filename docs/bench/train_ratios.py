"""Training step ratios: LoRA forward + backward and AdamW against their dense baselines.

    python docs/bench/train_ratios.py [BATCH ...]      (default: 64 512)
    python docs/bench/train_ratios.py --repeats 15 64
    python docs/bench/train_ratios.py --threads 1 --clock cpu
    OPENBLAS_NUM_THREADS=1 /path/to/torch/python docs/bench/train_ratios.py --torch \
        --threads 1 --clock cpu             (PEFT on torch, side by side)

``--clock wall`` (default) times with ``time.perf_counter``; ``--clock cpu``
with ``time.process_time`` (CPU seconds of the whole process), which on a
machine shared with other work measures the work done rather than the
waiting for a core; use it with ``--threads 1`` (with more threads it would
count OpenBLAS's spinning workers too).  ``--threads N`` sets both BLAS's and
Numba's thread counts.

4096 x 4096 float32, rank 16, on every core (BLAS and Numba threads as
configured).  Each repeat runs every candidate once, in a rotating order
(interleaved), and the figures are medians over repeats; the load average
is printed before and after, since the machine may be shared.

- ``fwd+bwd``: ``kernels.train.forward_train`` + ``kernels.train.backward``
  (preallocated Y, H, dX, dA, dB; dA/dB accumulate, beta = 1) against the
  two dense products ``np.matmul(X, W.T, out=Y)`` + ``np.matmul(dY, W,
  out=dX)`` (preallocated).
- ``fwd+bwd no dX``: ``forward_train`` + ``backward_factors`` against the
  one dense product ``X @ W.T``.
- ``layer API``: ``LoraLinear.forward_train`` + ``backward`` (allocating
  Y, H and dX each call) against the two dense products.
- ``adamw``: ``kernels.train.adamw_step`` on A (16 x 4096) and B (4096 x 16)
  against one read + write pass over the same four arrays (param, grad and
  both moments read, param and moments written: the least memory traffic an
  AdamW step can have), a parallel Numba loop on the same threads.
"""

import argparse
import os
import time

import numpy as np

if __name__ != "__main__" or "--torch" not in __import__("sys").argv:
    import numba
    from numba import njit, prange

    from numba_lora import LoraLinear
    from numba_lora.kernels import train as K
    from numba_lora.kernels._blas import blas_threads, set_blas_threads

    @njit(parallel=True, cache=True, nogil=True)
    def _pass_rows(P, G, M, V):
        for i in prange(P.shape[0]):
            for j in range(P.shape[1]):
                g = G[i, j]
                P[i, j] = P[i, j] + g
                M[i, j] = M[i, j] + g
                V[i, j] = V[i, j] + g


def rw_pass(arrays):
    for p, g, m, v in arrays:
        _pass_rows(p, g, m, v)


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def interleaved(candidates, repeats):
    """{name: median seconds}, every repeat running each candidate once, order rotated."""
    names = list(candidates)
    times = {name: [] for name in names}
    for name in names:  # warm up (compile, caches, BLAS threads)
        candidates[name]()
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t = clock()
            candidates[name]()
            times[name].append(clock() - t)
    return {name: float(np.median(v)) for name, v in times.items()}


def bench_batch(batch, repeats, rng, n=4096, rank=16):
    f32 = np.float32
    W = rng.standard_normal((n, n)).astype(f32)
    A = (rng.standard_normal((rank, n)) / np.sqrt(n)).astype(f32)
    B = (rng.standard_normal((n, rank)) * 1e-2).astype(f32)
    X = rng.standard_normal((batch, n)).astype(f32)
    dY = rng.standard_normal((batch, n)).astype(f32)
    Y, dX = np.empty((batch, n), f32), np.empty((batch, n), f32)
    H = np.empty((batch, rank), f32)
    dA, dB = np.zeros_like(A), np.zeros_like(B)
    layer = LoraLinear(W, rank=rank, alpha=32.0, seed=0)
    layer.lora_b = B
    s = 2.0

    def dense2():
        np.matmul(X, W.T, out=Y)
        np.matmul(dY, W, out=dX)

    def dense1():
        np.matmul(X, W.T, out=Y)

    def lora():
        K.forward_train(W, A, B, s, X, X, Y, H)
        K.backward(W, A, B, s, X, H, dY, dX, dA, dB, 1.0)

    def lora_no_dx():
        K.forward_train(W, A, B, s, X, X, Y, H)
        K.backward_factors(B, s, X, H, dY, dA, dB, 1.0)

    def api():
        _, ctx = layer.forward_train(X)
        layer.backward(dY, ctx)

    t = interleaved({"dense2": dense2, "dense1": dense1, "lora": lora,
                     "lora_no_dx": lora_no_dx, "api": api}, repeats)
    print(f"batch {batch:4d}: dense X@W.T + dY@W {t['dense2'] * 1e3:8.2f} ms | "
          f"fwd+bwd {t['lora'] / t['dense2']:.3f}x | "
          f"no dX {t['lora_no_dx'] / t['dense1']:.3f}x of X@W.T ({t['dense1'] * 1e3:.2f} ms) | "
          f"layer API {t['api'] / t['dense2']:.3f}x", flush=True)


def bench_adamw(repeats, rng, n=4096, rank=16):
    f32 = np.float32
    shapes = [(rank, n), (n, rank)]
    # param, grad, exp_avg, exp_avg_sq
    ours = [[rng.standard_normal(s).astype(f32), rng.standard_normal(s).astype(f32),
             np.zeros(s, f32), np.ones(s, f32)] for s in shapes]
    base = [[a.copy() for a in entry] for entry in ours]
    step = [0]

    def adamw():
        step[0] += 1
        for p, g, m, v in ours:
            K.adamw_step(p, g, m, v, step[0], 1e-3, 0.9, 0.999, 1e-8, 1e-2)

    t = interleaved({"adamw": adamw, "pass": lambda: rw_pass(base)}, repeats)
    print(f"adamw over A and B ({2 * rank * n} elements): {t['adamw'] * 1e6:8.1f} us, "
          f"{t['adamw'] / t['pass']:.2f}x one read+write pass ({t['pass'] * 1e6:.1f} us)",
          flush=True)


def bench_torch(batches, repeats, threads, n=4096, rank=16):
    """PEFT on torch, same shapes, against NumPy's dense products (run with torch's Python)."""
    import torch
    from peft import LoraConfig, get_peft_model

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    base = torch.nn.Sequential(torch.nn.Linear(n, n, bias=False))
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=32, target_modules=["0"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1e-2)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    W = model.base_model.model[0].base_layer.weight.detach().numpy()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    for batch in batches:
        X = torch.from_numpy(rng.standard_normal((batch, n)).astype(np.float32))
        Xg = X.clone().requires_grad_(True)
        dY = torch.from_numpy(rng.standard_normal((batch, n)).astype(np.float32))
        Xn, dYn = X.numpy(), dY.numpy()
        Y, dX = np.empty((batch, n), np.float32), np.empty((batch, n), np.float32)

        def dense2():
            np.matmul(Xn, W.T, out=Y)
            np.matmul(dYn, W, out=dX)

        def dense1():
            np.matmul(Xn, W.T, out=Y)

        def peft_dx():
            model(Xg).backward(dY)

        def peft_no_dx():
            model(X).backward(dY)

        def peft_step():
            model(Xg).backward(dY)
            opt.step()
            opt.zero_grad()

        t = interleaved({"dense2": dense2, "dense1": dense1, "dx": peft_dx, "nodx": peft_no_dx,
                         "step": peft_step}, repeats)
        print(f"batch {batch:4d}: PEFT fwd+bwd {t['dx'] / t['dense2']:.3f}x | "
              f"no dX {t['nodx'] / t['dense1']:.3f}x | fwd+bwd+AdamW "
              f"{t['step'] / t['dense2']:.3f}x (of NumPy's dense products)", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("batches", nargs="*", type=int, default=[64, 512])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=sorted(CLOCK), default="wall")
    parser.add_argument("--torch", action="store_true",
                        help="time PEFT on torch instead (run with a Python that has torch and "
                             "peft; set OPENBLAS_NUM_THREADS for NumPy's baseline)")
    args = parser.parse_args()
    global clock
    clock = CLOCK[args.clock]
    if args.torch:
        print(f"load before: {os.getloadavg()}", flush=True)
        bench_torch(args.batches, args.repeats, args.threads)
        print(f"load after: {os.getloadavg()}", flush=True)
        return
    if args.threads is not None:
        set_blas_threads(args.threads)
        numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"threads: BLAS {blas_threads()}, Numba {numba.get_num_threads()}; "
          f"clock: {args.clock}; cores: {os.cpu_count()}", flush=True)
    print(f"load before: {os.getloadavg()}", flush=True)
    for batch in args.batches:
        bench_batch(batch, args.repeats, rng)
    bench_adamw(max(args.repeats, 51), rng)
    print(f"load after: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
