"""What the bench times: each case's three callables on the same arrays.

- numba_lora: the ``LoraLinear`` (or ``MultiLoraLinear``) method;
- numpy: the composite a NumPy user writes, ``W @ x + s * (B @ (A @ x))``,
  ``X @ W.T + s * ((X @ A.T) @ B.T)``, ``W += s * (B @ A)``, or a loop over
  the adapters of a mixed batch;
- the baseline: the product LoRA adapts (``W @ x`` or ``X @ W.T`` into a
  preallocated output), for merge ``np.copyto`` of W (one read and one write
  of W, the least an in-place update can cost), for the multi-adapter cases a
  single-adapter ``forward_batch`` of the same rows.

Where torch and peft are installed, the multi-adapter cases also time PEFT's
``adapter_names=`` forward against PEFT's own single-adapter forward.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numba
import numpy as np

from ..errors import LoraConfigError
from ..layer import LoraLinear
from .report import Progress
from .timing import current_threads, interleaved, set_threads

__all__ = ["Result", "run_case", "run", "DEFAULT_SHAPES", "DEFAULT_RANKS", "DEFAULT_BATCHES",
           "MULTI_CASES", "ALPHA", "OPS", "QLORA_LAYERS"]

DEFAULT_SHAPES = ((4096, 4096),)
DEFAULT_RANKS = (16,)
DEFAULT_BATCHES = (1, 8, 64, 512)
ALPHA = 32.0

#: The two multi-adapter cases: (rows, adapters); rows are spread evenly.
MULTI_CASES = {"multi_mixed": (512, 8), "multi_per_row": (64, 64)}


@dataclass
class Result:
    """One benchmark row: medians in seconds, ratios to the baseline.

    ``dense_s`` is the baseline's time: the dense product for forward rows,
    a copy of W for merge rows, a single-adapter ``forward_batch`` of the
    same rows for the multi-adapter rows (``baseline`` names it).  The
    ratios are computed on construction.

    Parameters
    ----------
    op : str
        ``"forward"``, ``"merge"``, ``"unmerge"``, ``"multi_mixed"`` or
        ``"multi_per_row"``.
    out_features : int
        W's rows.
    in_features : int
        W's columns.
    rank : int
        The adapter's rank.
    dtype : str
        ``"float32"`` or ``"float64"``.
    batch : int
        Rows per call (1: one vector; 0 for merge rows).
    threads : int
        Numba's (and BLAS's) thread count during the case.
    repeats : int
        Timed calls of each callable.
    numba_lora_s : float
        Median seconds of numba_lora's call.
    numpy_s : float
        Median seconds of what a NumPy user writes.
    dense_s : float
        Median seconds of the baseline.
    baseline : str, default "dense"
        What ``dense_s`` timed.
    peft_s : float, optional
        Multi-adapter rows, with torch installed: PEFT's mixed batch.
    peft_single_s : float, optional
        PEFT's single-adapter batch of the same rows.

    Attributes
    ----------
    ratio : float
        ``numba_lora_s / dense_s``.
    numpy_ratio : float
        ``numpy_s / dense_s``.
    peft_ratio : float or None
        ``peft_s / peft_single_s``.
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


def run_case(op: str, shape: tuple[int, int], rank: int, dtype: str, batch: int = 1,
             threads: int | None = None, budget_s: float = 1.0) -> list[Result]:
    """Time one case; return a list of :class:`Result`.

    Parameters
    ----------
    op : str
        ``"forward"`` (``batch`` rows; 1 means one vector), ``"merge"``
        (two results, merge and unmerge), ``"multi_mixed"`` or
        ``"multi_per_row"`` (:data:`MULTI_CASES`; ``batch`` is ignored).
    shape : tuple of int
        W's (out_features, in_features).
    rank : int
        The adapter's rank.
    dtype : str
        ``"float32"`` or ``"float64"``.
    batch : int, default 1
        Rows per forward call.
    threads : int, optional
        The thread count to label the result with; None: the current one.
    budget_s : float, default 1.0
        Seconds of timing for the case (see
        :func:`~numba_lora.bench.timing.interleaved`).

    Returns
    -------
    list of Result
        One result, or two for ``"merge"``.

    See Also
    --------
    run : Every case of a grid.
    """
    layer, rng = _layer(shape, rank, dtype)
    threads = threads or current_threads()
    base = dict(out_features=shape[0], in_features=shape[1], rank=rank,
                dtype=np.dtype(dtype).name, threads=threads)
    if op == "forward":
        return [_forward_case(layer, rng, batch, base, budget_s)]
    if op == "merge":
        return _merge_cases(layer, base, budget_s)
    if op in MULTI_CASES:
        return [_multi_case(op, layer, rng, base, budget_s)]
    if op == "qlora":
        return [_qlora_case(layer, rng, batch, base, budget_s)]
    if op == "train":
        return [_train_case(layer, rng, batch, base, budget_s)]
    raise LoraConfigError(f"op must be one of {', '.join(repr(o) for o in OPS)}, got {op!r}")


#: The ops :func:`run_case` knows.
OPS = ("forward", "merge", "multi_mixed", "multi_per_row", "qlora", "train")

#: Distinct layers the NF4 case cycles over: 4 x 9 MiB of NF4 data cannot all
#: stay in a 32 MiB L3, as the 64 MiB float32 W cannot, so both sides of the
#: ratio read memory.
QLORA_LAYERS = 4


def _qlora_case(layer, rng, batch, base, budget_s):
    """NF4 base (blocksize 64) + the same float32 LoRA factors, against the float32 product."""
    import itertools

    from .. import nf4
    from ..qlora import QLoraLinear

    A, B = np.asarray(layer.lora_a, np.float32), np.asarray(layer.lora_b, np.float32)
    s = np.float32(layer.scaling)
    Ws, qlayers = [], []
    for k in range(QLORA_LAYERS):
        W = np.ascontiguousarray(layer.weight, np.float32) if k == 0 else (
            rng.standard_normal(layer.weight.shape) / np.sqrt(layer.in_features)
        ).astype(np.float32)
        q = QLoraLinear(W, layer.rank, layer.alpha, seed=rng)
        q.set_lora_a(A)
        q.set_lora_b(B)
        Ws.append(W)
        qlayers.append(q)
    shape = (layer.in_features,) if batch == 1 else (batch, layer.in_features)
    X = rng.standard_normal(shape).astype(np.float32)
    out = np.empty(shape[:-1] + (layer.out_features,), np.float32)
    nxt_q, nxt_w, nxt_np = (itertools.cycle(range(QLORA_LAYERS)) for _ in range(3))
    if batch == 1:
        def lora():
            qlayers[next(nxt_q)].forward(X, out=out)

        def dense():
            np.matmul(Ws[next(nxt_w)], X, out=out)
    else:
        def lora():
            qlayers[next(nxt_q)].forward_batch(X, out=out)

        def dense():
            np.matmul(X, Ws[next(nxt_w)].T, out=out)

    def numpy_way():
        # What a user without a fused kernel does (bitsandbytes' CPU matmul_4bit):
        # dequantize all of W, then the float32 product.
        q = qlayers[next(nxt_np)]
        W = nf4.dequantize(q.quantized)
        return X @ W.T + s * ((X @ A.T) @ B.T)

    (t_lora, t_np, t_dense), reps = interleaved([lora, numpy_way, dense], budget_s)
    base = dict(base, dtype="nf4")
    return Result("qlora_forward", batch=batch, repeats=reps, numba_lora_s=t_lora, numpy_s=t_np,
                  dense_s=t_dense, baseline="dense float32", **base)


def _train_case(layer, rng, batch, base, budget_s):
    """forward_train + backward (with dX) against the two dense products X @ W.T and dY @ W."""
    W, A, B, s, dtype = layer.weight, layer.lora_a, layer.lora_b, layer.scaling, layer.dtype
    X = rng.standard_normal((batch, layer.in_features)).astype(dtype)
    dY = rng.standard_normal((batch, layer.out_features)).astype(dtype)
    Y0 = np.empty((batch, layer.out_features), dtype)
    dX0 = np.empty((batch, layer.in_features), dtype)

    def lora():
        Y, ctx = layer.forward_train(X)
        layer.backward(dY, ctx)

    def numpy_way():
        T = X @ A.T
        Y = X @ W.T + s * (T @ B.T)
        G = dY @ B
        dB = s * (dY.T @ T)
        dA = s * (G.T @ X)
        dX = dY @ W + s * (G @ A)
        return Y, dA, dB, dX

    def dense():
        np.matmul(X, W.T, out=Y0)
        np.matmul(dY, W, out=dX0)

    try:
        (t_lora, t_np, t_dense), reps = interleaved([lora, numpy_way, dense], budget_s)
    finally:
        layer.zero_grad()
    return Result("train", batch=batch, repeats=reps, numba_lora_s=t_lora, numpy_s=t_np,
                  dense_s=t_dense, baseline="X @ W.T and dY @ W", **base)


def _forward_case(layer, rng, batch, base, budget_s):
    W, A, B, s, dtype = layer.weight, layer.lora_a, layer.lora_b, layer.scaling, layer.dtype
    if batch == 1:
        x = rng.standard_normal(layer.in_features).astype(dtype)
        out = np.empty(layer.out_features, dtype)
        funcs = [
            lambda: layer.forward(x, out=out),
            lambda: W @ x + s * (B @ (A @ x)),
            lambda: np.matmul(W, x, out=out),
        ]
        name = "forward"
    else:
        X = rng.standard_normal((batch, layer.in_features)).astype(dtype)
        out = np.empty((batch, layer.out_features), dtype)
        funcs = [
            lambda: layer.forward_batch(X, out=out),
            lambda: X @ W.T + s * ((X @ A.T) @ B.T),
            lambda: np.matmul(X, W.T, out=out),
        ]
        name = "forward_batch"
    (t_lora, t_np, t_dense), reps = interleaved(funcs, budget_s)
    return Result(name, batch=batch, repeats=reps, numba_lora_s=t_lora, numpy_s=t_np,
                  dense_s=t_dense, **base)


def _merge_cases(layer, base, budget_s):
    W, A, B, s = layer.weight, layer.lora_a, layer.lora_b, layer.scaling
    W_np = np.array(W)
    W_copy = np.empty_like(W_np)
    delta_dtype = layer.dtype.type(s)

    def np_merge():
        W_np.__iadd__(delta_dtype * (B @ A))

    def np_unmerge():
        W_np.__isub__(delta_dtype * (B @ A))

    def copy():
        np.copyto(W_copy, W_np)

    # Each pair is timed in its natural order (merge, then unmerge), so the
    # layer's state stays valid; the pairs are interleaved.
    def pair(first, second):
        def timed():
            t = time.perf_counter()
            first()
            t1 = time.perf_counter()
            second()
            return t1 - t, time.perf_counter() - t1
        return timed

    funcs = [pair(layer.merge, layer.unmerge), pair(np_merge, np_unmerge), pair(copy, copy)]
    med, reps = interleaved(funcs, budget_s, self_timed=True)
    return [
        Result(name, batch=0, repeats=reps, numba_lora_s=float(med[0][k]),
               numpy_s=float(med[1][k]), dense_s=float(med[2][k]), baseline="copy of W", **base)
        for k, name in enumerate(("merge", "unmerge"))
    ]


def _multi_case(op, layer, rng, base, budget_s):
    """Many adapters in one batch vs one adapter on the same rows."""
    from ..multi import MultiLoraLinear

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
    (t_multi, t_np, t_single), reps = interleaved(funcs, budget_s)
    peft_calls = _peft_batches(W, factors, ids, X)
    peft = interleaved(peft_calls, budget_s)[0] if peft_calls else (None, None)
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


def _plan(shapes, ranks, dtypes, batches, threads, merge, multi, quant=None, train=False):
    """Every case to run, in order: (threads, op, shape, rank, dtype, batch)."""
    plan = []
    for n in threads:
        for dtype in dtypes:
            for shape in shapes:
                for rank in ranks:
                    for batch in batches:
                        plan.append((n, "forward", shape, rank, dtype, batch))
                    if quant == "nf4" and dtype == "float32":
                        for batch in batches:
                            plan.append((n, "qlora", shape, rank, dtype, batch))
                    if train:
                        for batch in batches:
                            plan.append((n, "train", shape, rank, dtype, batch))
                    if merge:
                        plan.append((n, "merge", shape, rank, dtype, 0))
                    if multi:
                        for op, (rows, _) in MULTI_CASES.items():
                            plan.append((n, op, shape, rank, dtype, rows))
    return plan


def run(shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES, ranks: Sequence[int] = DEFAULT_RANKS,
        dtypes: Sequence[str] = ("float32",), batches: Sequence[int] = DEFAULT_BATCHES,
        threads: Sequence[int | None] = (None,), merge: bool = True, multi: bool = False,
        budget_s: float = 1.0, progress: bool = True, quant: str | None = None,
        train: bool = False) -> list[Result]:
    """Run every combination; return a list of :class:`Result`.

    Parameters
    ----------
    shapes : sequence of tuple of int
        W's shapes, (out_features, in_features).
    ranks : sequence of int
        Adapter ranks.
    dtypes : sequence of str
        ``"float32"`` and/or ``"float64"``.
    batches : sequence of int
        Rows per forward call (1: one vector).
    threads : sequence of int or None
        The thread counts to run under (Numba's and BLAS's together);
        ``None`` keeps the counts as set.
    merge : bool, default True
        Also time merge and unmerge.
    multi : bool, default False
        Also time the multi-adapter cases (:data:`MULTI_CASES`).
    budget_s : float, default 1.0
        Seconds of timing per case.
    progress : bool, default True
        Show progress on stderr.
    quant : {None, "nf4"}, default None
        ``"nf4"``: also time :class:`~numba_lora.QLoraLinear`'s forwards
        (float32 only) against the float32 product, cycling over
        :data:`QLORA_LAYERS` layers.
    train : bool, default False
        Also time ``forward_train`` + ``backward`` against the two dense
        products ``X @ W.T`` and ``dY @ W``.

    Returns
    -------
    list of Result
        In the order the cases ran.

    See Also
    --------
    run_case : One case.
    """
    if quant not in (None, "nf4"):
        raise LoraConfigError(f"quant must be None or 'nf4', got {quant!r}")
    plan = _plan(shapes, ranks, dtypes, batches, threads, merge, multi, quant, train)
    bar = Progress(len(plan)) if progress else None
    results = []
    for n, op, shape, rank, dtype, batch in plan:
        if bar:
            what = {"merge": "merge/unmerge", "forward": f"forward batch={batch}",
                    "qlora": f"NF4 forward batch={batch}",
                    "train": f"train batch={batch}"}.get(op, op)
            bar.step(f"{what} {shape[0]}x{shape[1]} r={rank} {dtype}"
                     + (f" threads={n}" if n else ""))
        restore = set_threads(n) if n else None
        try:
            results.extend(run_case(op, shape, rank, dtype, batch, n, budget_s))
        finally:
            if restore is not None:
                restore()
    if bar:
        bar.close()
    return results
