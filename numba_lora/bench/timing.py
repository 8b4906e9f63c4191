"""How the bench measures: interleaved medians, thread counts, memory, cold start.

Nothing here knows what is timed; :mod:`numba_lora.bench.cases` supplies the
callables.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numba
import numpy as np
from numpy.typing import DTypeLike

from .._threads import get_num_threads, set_num_threads
from ..kernels._blas import set_blas_threads

__all__ = ["interleaved", "current_threads", "set_threads", "cold_start", "cold_start_figures",
           "merge_peak_extra_bytes", "memory_rows"]


def interleaved(funcs: Sequence[Callable[[], Any]], budget_s: float, min_repeats: int = 5,
                max_repeats: int = 200, self_timed: bool = False) -> tuple[list[Any], int]:
    """Median time of each callable, calling them in turn (forward, then reversed).

    Interleaving (A B C, then C B A, ...) lets machine noise fall on every
    callable alike, so that their ratios hold even when the medians drift.

    Parameters
    ----------
    funcs : list of callables
        Called without arguments.
    budget_s : float
        Seconds of timing to spend on all of them together (after warm-up);
        the repeat count is clipped to ``[min_repeats, max_repeats]``.
    min_repeats : int, default 5
        Fewest timed calls of each callable, whatever the budget.
    max_repeats : int, default 200
        Most timed calls of each callable, whatever the budget.
    self_timed : bool
        Each callable times itself and returns a tuple of durations (several
        steps of one call); the medians are then arrays, one per step.

    Returns
    -------
    medians : list
        Per callable, a float (seconds) or with ``self_timed`` an array.
    repeats : int
        How many times each callable was timed.

    See Also
    --------
    numba_lora.bench.cases.run_case : Times one case with it.

    Examples
    --------
    >>> from numba_lora.bench.timing import interleaved
    >>> medians, repeats = interleaved([lambda: None, lambda: sum(range(100))], 0.01)
    >>> len(medians), repeats >= 5
    (2, True)
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


def current_threads() -> int:
    """Numba's thread count, the one a result is labelled with.

    Returns
    -------
    int
        ``numba.get_num_threads()`` in the calling thread.
    """
    return numba.get_num_threads()


def set_threads(n: int) -> Callable[[], None]:
    """Use ``n`` threads in Numba and in the BLAS (NumPy's, which the kernels share).

    Parameters
    ----------
    n : int
        Between 1 and ``numba.config.NUMBA_NUM_THREADS``.

    Returns
    -------
    callable
        Called without arguments, it restores the previous counts.
    """
    numba_before, blas_before = get_num_threads()
    set_num_threads(n)

    def restore():
        numba.set_num_threads(numba_before)
        if blas_before is not None:
            set_blas_threads(blas_before)

    return restore


def cold_start(dtype: str = "float32", shape: tuple[int, int] = (4096, 4096), rank: int = 16,
               cache_dir: str | os.PathLike[str] | None = None) -> float:
    """Seconds for a fresh interpreter to import numba_lora and run the first forward.

    Parameters
    ----------
    dtype : str, default "float32"
        The layer's dtype.
    shape : tuple of int, default (4096, 4096)
        The layer's (out_features, in_features).
    rank : int, default 16
        The layer's rank.
    cache_dir : str or os.PathLike, optional
        An empty directory makes the compile cold (``NUMBA_CACHE_DIR``);
        ``None`` uses the package's own (warm) cache.

    Returns
    -------
    float
        Seconds from the child's first statement to the end of its first
        forward.
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


def cold_start_figures() -> dict[str, float]:
    """The report's ``cold_start`` entry: median of three warm-cache starts, one cold.

    Returns
    -------
    dict
        ``warm_cache_s`` (median of three starts with the package's cache)
        and ``cold_cache_s`` (one start with an empty cache), in seconds.
    """
    cold_start()  # make sure the package cache is warm
    warm = [cold_start() for _ in range(3)]
    with tempfile.TemporaryDirectory() as tmp:
        cold = cold_start(cache_dir=tmp)
    return dict(warm_cache_s=float(np.median(warm)), cold_cache_s=cold)


# Run with ``python -c`` in a fresh process, so that the peak it reads is the
# merge's and not the parent's.
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


def merge_peak_extra_bytes(shape: tuple[int, int], rank: int, dtype: DTypeLike,
                           side: str = "numba_lora") -> int:
    """Growth of peak RSS during one merge, in bytes, measured in a fresh process.

    On Linux the peak is reset after the warm-up (``/proc/self/clear_refs``);
    elsewhere it is the process's lifetime peak, which compilation may
    already have raised above the merge's.

    Parameters
    ----------
    shape : tuple of int
        W's (out_features, in_features).
    rank : int
        The adapter's rank.
    dtype : str or numpy.dtype
        ``float32`` or ``float64``.
    side : {"numba_lora", "numpy"}
        ``kernels.merge``, or NumPy's ``W += s * (B @ A)``.

    Returns
    -------
    int
        Bytes the peak resident set grew by.
    """
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(shape[0]), str(shape[1]), str(rank),
         np.dtype(dtype).name, side],
        check=True, capture_output=True, text=True,
    ).stdout
    return int(out.strip().splitlines()[-1])


def memory_rows(shapes: Sequence[tuple[int, int]], ranks: Sequence[int],
                dtypes: Sequence[str]) -> list[dict[str, Any]]:
    """The report's ``memory`` entry: one merge's extra peak memory, both sides, per case.

    Parameters
    ----------
    shapes : list of tuple of int
        W's shapes, (out_features, in_features).
    ranks : list of int
        Adapter ranks.
    dtypes : list of str
        ``float32`` and/or ``float64``.

    Returns
    -------
    list of dict
        One row per shape, rank and dtype: W's bytes and, for
        ``numba_lora`` and ``numpy``, the extra bytes and their fraction of W.
    """
    rows = []
    for shape in shapes:
        for rank in ranks:
            for dtype in dtypes:
                w_bytes = shape[0] * shape[1] * np.dtype(dtype).itemsize
                row = dict(out_features=shape[0], in_features=shape[1], rank=rank,
                           dtype=dtype, weight_bytes=w_bytes)
                for side in ("numba_lora", "numpy"):
                    extra = merge_peak_extra_bytes(shape, rank, dtype, side)
                    row[f"{side}_extra_bytes"] = extra
                    row[f"{side}_extra_fraction"] = extra / w_bytes
                rows.append(row)
    return rows
