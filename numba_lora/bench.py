"""``python -m numba_lora bench``: numba_lora beside plain NumPy and the dense BLAS call.

Each case times three things on the same arrays, interleaved (A B C, then
C B A, ...) so that machine noise falls on all three alike, and reports
medians and their ratios to the dense baseline:

- numba_lora: the ``LoraLinear`` method (unmerged, enabled);
- numpy: the composite a NumPy user writes, ``W @ x + s * (B @ (A @ x))``,
  ``X @ W.T + s * ((X @ A.T) @ B.T)`` or ``W += s * (B @ A)``;
- dense: the product LoRA adapts, ``W @ x`` or ``X @ W.T`` into a
  preallocated output, or for merge ``np.copyto`` of W (one read and one
  write of W, the least an in-place update can cost).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import numba
import numpy as np

from .kernels._blas import set_blas_threads
from .layer import LoraLinear

__all__ = ["Result", "run_case", "run", "format_table", "main"]

DEFAULT_SHAPES = ((4096, 4096),)
DEFAULT_RANKS = (16,)
DEFAULT_BATCHES = (1, 8, 64, 512)
ALPHA = 32.0


@dataclass
class Result:
    """One benchmark row: medians in seconds, ratios to the baseline.

    ``dense_s`` is the baseline's time: the dense product for forward rows,
    a copy of W for merge rows, a single-adapter ``forward_batch`` of the
    same rows for the multi-adapter rows (``baseline`` names it).
    """

    op: str
    out_features: int
    in_features: int
    rank: int
    dtype: str
    batch: int
    threads: int
    repeats: int
    numba_lora_s: float
    numpy_s: float
    dense_s: float
    baseline: str = "dense"
    peft_s: float = None
    peft_single_s: float = None
    ratio: float = field(init=False)
    numpy_ratio: float = field(init=False)
    peft_ratio: float = field(init=False)

    def __post_init__(self):
        self.ratio = self.numba_lora_s / self.dense_s
        self.numpy_ratio = self.numpy_s / self.dense_s
        # PEFT against PEFT's own single-adapter batch, timed apart from the
        # rest so that torch's thread pool does not disturb the other figures.
        self.peft_ratio = None if self.peft_s is None else self.peft_s / self.peft_single_s


def _layer(shape, rank, dtype, seed=0):
    rng = np.random.default_rng(seed)
    out_features, in_features = shape
    W = (rng.standard_normal(shape) / np.sqrt(in_features)).astype(dtype)
    layer = LoraLinear(W, rank, ALPHA, seed=rng)
    layer.lora_b = rng.standard_normal((out_features, rank)) * 0.01
    return layer, rng


def _interleaved(funcs, budget_s, min_repeats=5, max_repeats=200, self_timed=False):
    """Median time of each callable, calling them in turn (forward, then reversed).

    With ``self_timed`` each callable times itself and returns a tuple of
    durations (several steps of one call); the medians are then arrays.
    """
    def sample(f):
        if self_timed:
            return f()
        t = time.perf_counter()
        f()
        return time.perf_counter() - t

    for f in funcs:  # warm-up: compilation, page faults, BLAS thread start
        f()
        f()
    one_round = sum(np.sum(sample(f)) for f in funcs)
    repeats = int(min(max_repeats, max(min_repeats, budget_s / max(one_round, 1e-9))))
    samples = [[] for _ in funcs]
    order = list(range(len(funcs)))
    for r in range(repeats):
        for i in order if r % 2 == 0 else order[::-1]:
            samples[i].append(sample(funcs[i]))
    medians = [np.median(np.array(s), axis=0) for s in samples]
    return [m if self_timed else float(m) for m in medians], repeats


def run_case(op, shape, rank, dtype, batch=1, threads=None, budget_s=1.0):
    """Time one case; ``op`` is ``"forward"`` (``batch`` rows; 1 means one vector) or ``"merge"``.

    ``"merge"`` returns two results, merge and unmerge.
    """
    layer, rng = _layer(shape, rank, dtype)
    W, A, B, s = layer.weight, layer.lora_a, layer.lora_b, layer.scaling
    threads = threads or _current_threads()
    base = dict(out_features=shape[0], in_features=shape[1], rank=rank,
                dtype=np.dtype(dtype).name, threads=threads)
    if op == "forward":
        if batch == 1:
            x = rng.standard_normal(shape[1]).astype(dtype)
            out = np.empty(shape[0], dtype)
            funcs = [
                lambda: layer.forward(x, out=out),
                lambda: W @ x + s * (B @ (A @ x)),
                lambda: np.matmul(W, x, out=out),
            ]
            name = "forward"
        else:
            X = rng.standard_normal((batch, shape[1])).astype(dtype)
            out = np.empty((batch, shape[0]), dtype)
            funcs = [
                lambda: layer.forward_batch(X, out=out),
                lambda: X @ W.T + s * ((X @ A.T) @ B.T),
                lambda: np.matmul(X, W.T, out=out),
            ]
            name = "forward_batch"
        (t_lora, t_np, t_dense), reps = _interleaved(funcs, budget_s)
        return [Result(name, batch=batch, repeats=reps, numba_lora_s=t_lora,
                       numpy_s=t_np, dense_s=t_dense, **base)]
    if op == "merge":
        W_np = np.array(W)
        W_copy = np.empty_like(W_np)
        delta_dtype = np.dtype(dtype).type(s)

        def np_merge():
            W_np.__iadd__(delta_dtype * (B @ A))

        def np_unmerge():
            W_np.__isub__(delta_dtype * (B @ A))

        # Each pair is timed in its natural order (merge, then unmerge), so
        # the layer's state stays valid; the pairs are interleaved.
        def both_lora():
            t = time.perf_counter()
            layer.merge()
            t1 = time.perf_counter()
            layer.unmerge()
            return t1 - t, time.perf_counter() - t1

        def both_numpy():
            t = time.perf_counter()
            np_merge()
            t1 = time.perf_counter()
            np_unmerge()
            return t1 - t, time.perf_counter() - t1

        def both_copy():
            t = time.perf_counter()
            np.copyto(W_copy, W_np)
            t1 = time.perf_counter()
            np.copyto(W_copy, W_np)
            return t1 - t, time.perf_counter() - t1

        med, reps = _interleaved([both_lora, both_numpy, both_copy], budget_s, self_timed=True)
        return [
            Result(name, batch=0, repeats=reps, numba_lora_s=float(med[0][k]),
                   numpy_s=float(med[1][k]), dense_s=float(med[2][k]), baseline="copy of W",
                   **base)
            for k, name in enumerate(("merge", "unmerge"))
        ]
    if op in ("multi_mixed", "multi_per_row"):
        return [_multi_case(op, layer, rng, base, budget_s)]
    raise ValueError(f"op must be 'forward', 'merge', 'multi_mixed' or 'multi_per_row', got {op!r}")


#: The two multi-adapter cases: (rows, adapters); rows are spread evenly.
MULTI_CASES = {"multi_mixed": (512, 8), "multi_per_row": (64, 64)}


def _multi_case(op, layer, rng, base, budget_s):
    """Many adapters in one batch vs one adapter on the same rows."""
    from .multi import MultiLoraLinear

    batch, n_adapters = MULTI_CASES[op]
    W, dtype, rank = layer.weight, layer.dtype, layer.rank
    multi = MultiLoraLinear(W)
    factors = []
    for i in range(n_adapters):
        A = rng.uniform(-1, 1, (rank, layer.in_features)) / np.sqrt(layer.in_features)
        B = rng.standard_normal((layer.out_features, rank)) * 0.01
        multi.add_adapter(f"adapter{i}", A, B, ALPHA)
        factors.append((A.astype(dtype), B.astype(dtype), ALPHA / rank))
    layer.lora_a, layer.lora_b = factors[0][0], factors[0][1]
    ids = np.arange(batch) % n_adapters
    X = rng.standard_normal((batch, layer.in_features)).astype(dtype)
    out = np.empty((batch, layer.out_features), dtype)

    def numpy_loop():
        # What a NumPy user writes: the dense product once, then each
        # adapter's rows gathered, adapted and added back.
        Y = X @ W.T
        for i, (A, B, s) in enumerate(factors):
            rows = np.flatnonzero(ids == i)
            if rows.size:
                Xi = X[rows]
                Y[rows] += s * ((Xi @ A.T) @ B.T)
        return Y

    funcs = [
        lambda: multi.forward_batch(X, ids, out=out),
        numpy_loop,
        lambda: layer.forward_batch(X, out=out),
    ]
    (t_multi, t_np, t_single), reps = _interleaved(funcs, budget_s)
    peft_calls = _peft_batches(W, factors, ids, X)
    peft = _interleaved(peft_calls, budget_s)[0] if peft_calls else (None, None)
    return Result(op, batch=batch, repeats=reps, numba_lora_s=t_multi, numpy_s=t_np,
                  dense_s=t_single, baseline=f"1 adapter, {n_adapters} in the batch",
                  peft_s=peft[0], peft_single_s=peft[1], **base)


def _peft_batches(W, factors, ids, X):
    """PEFT's mixed-adapter forward (``adapter_names=``) and its one-adapter forward, or None.

    Only where torch and peft are installed; neither is a dependency.
    """
    try:
        import torch
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None

    class _One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)

        def forward(self, x):
            return self.lin(x)

    torch.set_num_threads(numba.get_num_threads())
    base = _One()
    with torch.no_grad():
        base.lin.weight.copy_(torch.from_numpy(np.array(W)))
    model = None
    for i, (A, B, s) in enumerate(factors):
        config = LoraConfig(r=A.shape[0], lora_alpha=s * A.shape[0], target_modules=["lin"])
        if model is None:
            model = get_peft_model(base, config, adapter_name=f"adapter{i}")
        else:
            model.add_adapter(f"adapter{i}", config)
        lin = model.base_model.model.lin
        with torch.no_grad():
            lin.lora_A[f"adapter{i}"].weight.copy_(torch.from_numpy(A))
            lin.lora_B[f"adapter{i}"].weight.copy_(torch.from_numpy(B))
    model.eval()
    model.set_adapter("adapter0")
    names = [f"adapter{i}" for i in ids]
    xt = torch.from_numpy(X)

    def mixed():
        with torch.no_grad():
            return model(xt, adapter_names=names)

    def single():
        with torch.no_grad():
            return model(xt)

    return [mixed, single]


def _current_threads():
    return numba.get_num_threads()


class _Progress:
    """A one-line progress bar on stderr (a line per step when not a terminal)."""

    def __init__(self, total, stream=sys.stderr):
        self.total, self.done, self.stream = total, 0, stream
        self.tty = stream.isatty()

    def step(self, label):
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        line = f"[{bar}] {self.done}/{self.total} {label}"
        if self.tty:
            self.stream.write("\r" + line.ljust(78)[:78])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.done += 1

    def close(self):
        if self.tty:
            self.stream.write("\r" + " " * 78 + "\r")
            self.stream.flush()


def _set_threads(n):
    """Use ``n`` threads in Numba and in the BLAS (NumPy's, which the kernels share)."""
    from ._threads import get_num_threads, set_num_threads

    numba_before, blas_before = get_num_threads()
    set_num_threads(n)

    def restore():
        numba.set_num_threads(numba_before)
        if blas_before is not None:
            set_blas_threads(blas_before)

    return restore


def run(shapes=DEFAULT_SHAPES, ranks=DEFAULT_RANKS, dtypes=("float32",),
        batches=DEFAULT_BATCHES, threads=(None,), merge=True, multi=False, budget_s=1.0,
        progress=True):
    """Run every combination; return a list of :class:`Result`."""
    plan = []
    for n in threads:
        for dtype in dtypes:
            for shape in shapes:
                for rank in ranks:
                    for batch in batches:
                        plan.append((n, "forward", shape, rank, dtype, batch))
                    if merge:
                        plan.append((n, "merge", shape, rank, dtype, 0))
                    if multi:
                        for op in MULTI_CASES:
                            plan.append((n, op, shape, rank, dtype, MULTI_CASES[op][0]))
    bar = _Progress(len(plan)) if progress else None
    results = []
    for n, op, shape, rank, dtype, batch in plan:
        if bar:
            what = {"merge": "merge/unmerge", "forward": f"forward batch={batch}"}.get(op, op)
            bar.step(f"{what} {shape[0]}x{shape[1]} r={rank} {dtype}"
                     + (f" threads={n}" if n else ""))
        restore = _set_threads(n) if n else None
        try:
            results.extend(run_case(op, shape, rank, dtype, batch, n, budget_s))
        finally:
            if restore is not None:
                restore()
    if bar:
        bar.close()
    return results


def format_table(results):
    """Results as a plain-text table."""
    header = (f"{'operation':<14}{'shape':>11}{'rank':>5}{'dtype':>8}{'batch':>6}{'thr':>4}"
              f"{'numba_lora':>12}{'numpy':>11}{'baseline':>11}{'lora/base':>11}{'numpy/base':>12}")
    lines = [header, "-" * len(header)]
    baselines = []
    peft_rows = [r for r in results if r.peft_s is not None]
    for r in results:
        batch = "-" if r.op in ("merge", "unmerge") else str(r.batch)
        if r.baseline not in baselines:
            baselines.append(r.baseline)
        lines.append(
            f"{r.op:<14}{f'{r.out_features}x{r.in_features}':>11}{r.rank:>5}{r.dtype:>8}"
            f"{batch:>6}{r.threads:>4}{_ms(r.numba_lora_s):>12}{_ms(r.numpy_s):>11}"
            f"{_ms(r.dense_s):>11}{r.ratio:>10.3f}x{r.numpy_ratio:>11.3f}x"
        )
    notes = {
        "dense": "forward rows: the dense W @ x / X @ W.T into a preallocated output",
        "copy of W": "merge rows: np.copyto of W (one read and one write of W)",
    }
    for r in peft_rows:
        lines.append(f"PEFT adapter_names= forward, {r.op} {r.out_features}x{r.in_features} "
                     f"r={r.rank}: {_ms(r.peft_s)} ms, {r.peft_ratio:.3f}x PEFT's one-adapter "
                     f"batch ({_ms(r.peft_single_s)} ms)")
    lines.append("times are medians in ms; baseline =")
    for name in baselines:
        lines.append("  " + notes.get(name, f"multi rows: a single-adapter forward_batch of the "
                                              f"same rows ({name})"))
    return "\n".join(lines)


def _ms(seconds):
    return f"{seconds * 1e3:.3f}"


def machine_info():
    """What the figures were measured on."""
    import scipy

    from .kernels._blas import PROVIDER, blas_threads

    return dict(
        python=platform.python_version(), numpy=np.__version__, scipy=scipy.__version__,
        numba=numba.__version__, machine=platform.machine(), cpus=os.cpu_count(),
        processor=platform.processor() or platform.machine(),
        numba_threads=numba.get_num_threads(),
        threading_layer=_threading_layer(), blas=PROVIDER, blas_threads=blas_threads(),
    )


def _threading_layer():
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return None


def cold_start(dtype="float32", shape=(4096, 4096), rank=16, cache_dir=None):
    """Seconds for a fresh interpreter to import numba_lora and run the first forward.

    With ``cache_dir`` pointing at an empty directory the compile is cold;
    with ``None`` the package's own (warm) cache is used.
    """
    code = (
        "import time; t=time.perf_counter(); import numpy as np, numba_lora; "
        f"layer=numba_lora.LoraLinear(np.ones({shape}, np.{dtype}), {rank}, 32.0, seed=0); "
        f"layer.forward(np.ones({shape[1]}, np.{dtype})); "
        "print(time.perf_counter()-t)"
    )
    env = dict(os.environ)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = str(cache_dir)
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


_MEMORY_SCRIPT = """
import os, resource, sys
import numpy as np
from numba_lora import kernels


def peak_bytes():
    # Linux: VmHWM, which clear_refs can reset; elsewhere the lifetime peak.
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


out_features, in_features, rank, dtype, side = sys.argv[1:]
out_features, in_features, rank = int(out_features), int(in_features), int(rank)
rng = np.random.default_rng(0)
W = np.empty((out_features, in_features), dtype)
for i in range(0, out_features, 256):
    W[i:i + 256] = rng.standard_normal(W[i:i + 256].shape)
A = rng.uniform(-0.01, 0.01, (rank, in_features)).astype(dtype)
B = rng.standard_normal((out_features, rank)).astype(dtype)
s = W.dtype.type(2.0)
if side == "numba_lora":
    def op():
        kernels.merge(W, A, B, s)
else:
    def op():
        W.__iadd__(s * (B @ A))
# Warm-up for both sides alike (compilation, BLAS's buffers for this size);
# the peak is then reset, so compiling cannot hide what the merge allocates.
kernels.merge(W, A, B, s)
kernels.unmerge(W, A, B, s)
reset_peak()
before = peak_bytes()
op()
print(peak_bytes() - before)
"""


def merge_peak_extra_bytes(shape, rank, dtype, side="numba_lora"):
    """Growth of peak RSS during one merge, in bytes, measured in a fresh process.

    ``side`` is ``"numba_lora"`` (``kernels.merge``) or ``"numpy"``
    (``W += s * (B @ A)``).  On Linux the peak is reset after the warm-up
    (``/proc/self/clear_refs``); elsewhere it is the process's lifetime peak,
    which compilation may already have raised above the merge's.
    """
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(shape[0]), str(shape[1]), str(rank),
         np.dtype(dtype).name, side],
        check=True, capture_output=True, text=True,
    ).stdout
    return int(out.strip().splitlines()[-1])


def describe_extras(report):
    """Sentences for the memory and cold-start figures of a report, if it has them.

    Shared by the bench's table and docs/make_performance.py.
    """
    lines = []
    for row in report.get("memory", []):
        lines.append(
            f"Peak extra memory of one merge, {row['out_features']}x{row['in_features']} "
            f"rank {row['rank']} {row['dtype']} (growth of peak RSS in a fresh process): "
            f"numba_lora {row['numba_lora_extra_bytes'] / 2**20:.2f} MiB "
            f"({100 * row['numba_lora_extra_fraction']:.2f}% of W's bytes), NumPy's "
            f"W += s * (B @ A) {row['numpy_extra_bytes'] / 2**20:.1f} MiB "
            f"({100 * row['numpy_extra_fraction']:.0f}% of W's bytes)."
        )
    if "cold_start" in report:
        cs = report["cold_start"]
        lines.append(
            f"Cold start, a fresh process importing numba_lora and running the first "
            f"forward: {cs['warm_cache_s']:.2f} s with a warm cache, "
            f"{cs['cold_cache_s']:.2f} s compiling from scratch."
        )
    return lines


def _shape(text):
    try:
        out_features, in_features = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 4096x4096, got {text!r}") from None
    return out_features, in_features


def _int_list(text):
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parser():
    p = argparse.ArgumentParser(
        prog="python -m numba_lora bench",
        description="Time numba_lora against plain NumPy and the dense BLAS product.",
    )
    p.add_argument("--shape", type=_shape, action="append",
                   help="weight shape OUTxIN (repeatable; default 4096x4096)")
    p.add_argument("--rank", type=_int_list, default=list(DEFAULT_RANKS),
                   help="comma-separated ranks (default 16)")
    p.add_argument("--dtype", default="float32",
                   help="comma-separated dtypes: float32, float64 (default float32)")
    p.add_argument("--batch", type=_int_list, default=list(DEFAULT_BATCHES),
                   help="comma-separated batch sizes; 1 = forward on one vector "
                        "(default 1,8,64,512)")
    p.add_argument("--threads", type=_int_list, default=None,
                   help="comma-separated thread counts for Numba and BLAS (default: as set)")
    p.add_argument("--no-merge", action="store_true", help="skip merge/unmerge")
    p.add_argument("--no-multi", action="store_true",
                   help="skip the multi-adapter cases (512 rows over 8 adapters; 64 rows, 64 adapters)")
    p.add_argument("--budget", type=float, default=1.0,
                   help="seconds of timing per case (default 1.0)")
    p.add_argument("--cold-start", action="store_true",
                   help="also time a fresh process's import + first forward, cache warm and cold")
    p.add_argument("--memory", action="store_true",
                   help="also measure the peak extra memory of one merge (fresh processes)")
    p.add_argument("--json", metavar="PATH",
                   help="also write results as JSON to PATH ('-' for stdout, table to stderr)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    dtypes = [d.strip() for d in args.dtype.split(",")]
    for d in dtypes:
        if d not in ("float32", "float64"):
            parser().error(f"--dtype must be float32 or float64, got {d!r}")
    results = run(shapes=args.shape or DEFAULT_SHAPES, ranks=args.rank, dtypes=dtypes,
                  batches=args.batch, threads=args.threads or [None],
                  merge=not args.no_merge, multi=not args.no_multi, budget_s=args.budget)
    report = dict(machine=machine_info(), results=[asdict(r) for r in results])
    if args.cold_start:
        import tempfile

        cold_start()  # make sure the package cache is warm
        warm = [cold_start() for _ in range(3)]
        with tempfile.TemporaryDirectory() as tmp:
            cold = cold_start(cache_dir=tmp)
        report["cold_start"] = dict(warm_cache_s=float(np.median(warm)), cold_cache_s=cold)
    if args.memory:
        report["memory"] = []
        for shape in args.shape or DEFAULT_SHAPES:
            for rank in args.rank:
                for dtype in dtypes:
                    w_bytes = shape[0] * shape[1] * np.dtype(dtype).itemsize
                    row = dict(out_features=shape[0], in_features=shape[1], rank=rank,
                               dtype=dtype, weight_bytes=w_bytes)
                    for side in ("numba_lora", "numpy"):
                        extra = merge_peak_extra_bytes(shape, rank, dtype, side)
                        row[f"{side}_extra_bytes"] = extra
                        row[f"{side}_extra_fraction"] = extra / w_bytes
                    report["memory"].append(row)
    table = "\n".join([format_table(results)] + describe_extras(report))
    text_stream = sys.stderr if args.json == "-" else sys.stdout
    print(table, file=text_stream)
    if args.json:
        payload = json.dumps(report, indent=2)
        if args.json == "-":
            print(payload)
        else:
            with open(args.json, "w") as fh:
                fh.write(payload + "\n")
    return 0
