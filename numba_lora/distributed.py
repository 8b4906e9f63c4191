"""Dask: the checkpoint merge as one task per shard, and batch inference over row chunks.

An optional extra: ``pip install "numba_lora[dask]"`` (dask and distributed).
This module adds no arithmetic, only partitioning and gathering: each task
runs the same code a single process runs (:func:`numba_lora.checkpoint.write_shard`,
``layer.forward_batch``), so results are the single-process results.

- :func:`merge`: :func:`numba_lora.checkpoint.merge` over a
  ``dask.distributed.Client``: planned and checked on the client, one task
  per shard on the workers, committed on the client.  Workers must see the
  base, adapter and output paths (a shared file system).
- :func:`forward_batch`: a layer's ``forward_batch`` over a row-chunked
  ``dask.array``, the layer scattered to every worker once.
- :func:`thread_counts`: Numba and BLAS threads per task so that tasks times
  threads never exceeds a host's cores; every task sets them before it
  computes.

See ``docs/dask.rst``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numba
import numpy as np
from numpy.typing import ArrayLike

from . import checkpoint
from ._threads import set_num_threads
from ._validate import check_flag
from .errors import LoraEnvironmentError, LoraShapeError, LoraTypeError
from .io.safetensors import as_path

if TYPE_CHECKING:  # optional dependencies, imported on first use
    import dask.array
    import distributed

    from .layer import LoraLinear
    from .multi import MultiLoraLinear



def _dask():
    """dask.array and distributed, imported on first use: this module imports without them."""
    try:
        import dask.array
        import distributed
    except ImportError as exc:
        raise LoraEnvironmentError(
            "numba_lora.distributed needs dask and distributed: "
            f"pip install \"numba_lora[dask]\" ({exc})") from exc
    return dask.array, distributed

__all__ = ["merge", "forward_batch", "thread_counts"]


# --------------------------------------------------------------- threads
def _cores():
    """Cores this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_counts(client: distributed.Client) -> dict[str, int]:
    """``{worker address: threads}``: Numba and BLAS threads for each of that worker's tasks.

    A host's cores are shared out over the tasks that can run on it at once
    (the sum of its workers' ``nthreads``): ``max(1, cores // tasks)``, so
    that workers x task threads x Numba/BLAS threads stays within the cores.
    Two single-threaded workers on a 2-core machine get 1 each; one worker
    with one thread on a 32-core host gets 32.

    Parameters
    ----------
    client : distributed.Client
        A client of the cluster the tasks will run on.

    Returns
    -------
    dict of str to int
        Each worker's address and the thread count its tasks set.

    See Also
    --------
    numba_lora.set_num_threads : What each task calls with its count.

    Examples
    --------
    >>> import dask.array as da
    >>> import numpy as np
    >>> from distributed import Client
    >>> from numba_lora import LoraLinear, distributed
    >>> client = Client(processes=False, n_workers=1, threads_per_worker=1,
    ...                 dashboard_address=None)
    >>> counts = distributed.thread_counts(client)
    >>> all(n >= 1 for n in counts.values())
    True
    >>> client.close()
    """
    workers = client.scheduler_info(n_workers=-1)["workers"] if _takes_n_workers(client) \
        else client.scheduler_info()["workers"]
    cores = client.run(_cores)
    tasks_per_host = {}
    for info in workers.values():
        tasks_per_host[info["host"]] = tasks_per_host.get(info["host"], 0) + info["nthreads"]
    return {address: max(1, cores.get(address, 1) // tasks_per_host[info["host"]])
            for address, info in workers.items()}


def _takes_n_workers(client):
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters


def _use_threads(threads):
    """In a task: set this thread's Numba count and the process's BLAS count."""
    if isinstance(threads, dict):
        _, dist = _dask()
        try:
            n = threads.get(dist.get_worker().address, 1)
        except ValueError:  # not on a worker (a local scheduler): leave them
            return
    else:
        n = threads
    set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


def _check_threads(client, threads):
    if threads is None:
        return thread_counts(client)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise LoraTypeError(f"threads must be None or an int >= 1, got {threads!r}")
    return threads


# ------------------------------------------------------------------ merge
def _write_shard_task(shard, plan, directory, threads, sync):
    _use_threads(threads)
    return checkpoint.write_shard(plan, shard, directory, sync=sync)


def merge(client: distributed.Client, base: str | os.PathLike[str],
          adapter: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
          out: str | os.PathLike[str], *, dtype: str = "keep",
          weights: Sequence[float] | None = None, combination: str | None = None,
          threads: int | None = None, sync: bool = True) -> checkpoint.MergeResult:
    """:func:`numba_lora.checkpoint.merge` with one Dask task per shard.

    Everything is checked on the client before any task starts (the same
    checks, the same errors).  The shards are written by the workers into
    the staging directory beside ``out``; when every task has succeeded the
    client copies the other files and renames the staging directory to
    ``out``.  If any task fails, the client waits for the others to end,
    removes the staging directory and raises the first task's error: as
    with one process, no ``out`` and no half-written shard.

    The result is bit-identical to the single-process merge: each task runs
    :func:`~numba_lora.checkpoint.write_shard`, whose arithmetic does not
    depend on the thread count.

    Parameters
    ----------
    client : distributed.Client
        A client of the cluster; its workers must reach the same paths (a
        shared file system).
    base : str or os.PathLike
        A Hugging Face checkpoint directory, as for
        :func:`numba_lora.checkpoint.merge`.  Relative paths are made
        absolute on the client.
    adapter : str or os.PathLike, or list of them
        A PEFT LoRA adapter directory, or several merged together (see
        ``weights``).
    out : str or os.PathLike
        A new or empty directory, not the base's or the adapter's.
    dtype : {"keep"}
        Every tensor keeps its stored dtype, as for
        :func:`numba_lora.checkpoint.merge`.
    weights, combination : optional
        Several adapters' weights and PEFT combination (``"cat"`` or
        ``"linear"``), as for :func:`numba_lora.checkpoint.merge`.
    threads : int or None
        Numba and BLAS threads per task; None: :func:`thread_counts`.
    sync : bool
        ``True`` (default): each worker has its shard on disk before it
        renames it into place; ``False``: once its bytes are in the worker's
        page cache, as for :func:`numba_lora.checkpoint.merge`.  A failure
        leaves nothing half-written either way.

    Returns
    -------
    numba_lora.checkpoint.MergeResult
        What was written, as the single-process merge reports it.

    Raises
    ------
    LoraEnvironmentError
        If dask or distributed is not installed.
    LoraTypeError
        If ``threads`` is not None or an int >= 1, or ``sync`` is not a bool.
    LoraError
        Whatever :func:`numba_lora.checkpoint.merge` raises for these
        files, before any task starts.

    See Also
    --------
    numba_lora.checkpoint.merge : The same in one process.

    Examples
    --------
    >>> from distributed import Client                              # doctest: +SKIP
    >>> from numba_lora import distributed
    >>> with Client("tcp://scheduler:8786") as client:               # doctest: +SKIP
    ...     result = distributed.merge(client, "/shared/base-model", "/shared/adapter",
    ...                                "/shared/merged")
    """
    _dask()
    start = time.perf_counter()
    sync = check_flag(sync, "sync")
    # Absolute paths: a worker's working directory need not be the client's.
    base, out = (as_path(p, what).absolute() for p, what in ((base, "base"), (out, "out")))
    if isinstance(adapter, (list, tuple)):
        adapter = [as_path(a, "adapter").absolute() for a in adapter]
    else:
        adapter = as_path(adapter, "adapter").absolute()
    plan = checkpoint.plan_merge(base, adapter, dtype=dtype, weights=weights,
                                 combination=combination)
    threads = _check_threads(client, threads)
    output = checkpoint.Output(plan, out)
    futures = []
    try:
        futures = [client.submit(_write_shard_task, shard, plan, str(output.staging), threads,
                                 sync, key=f"numba_lora-merge-{output.staging.name}-{k}", pure=False)
                   for k, shard in enumerate(plan.shards)]
        _dask()[1].wait(futures)  # every task has ended, so none still writes when we clean up
        written = sum(client.gather(futures))
        output.commit()
    except BaseException:
        if futures:
            client.cancel(futures)
        output.abort()
        raise
    return checkpoint.MergeResult(
        out=output.out,
        shards=plan.shards,
        merged=tuple(m.tensor for m in plan.merges),
        copied=((plan.checkpoint.index,) if plan.checkpoint.index else ())
        + plan.checkpoint.other_files,
        skipped=plan.checkpoint.skipped,
        bytes=written,
        seconds=time.perf_counter() - start,
    )


# -------------------------------------------------------- batch inference
def _forward_block(X, layer, threads):
    _use_threads(threads)
    return layer.forward_batch(X)


def _forward_multi_block(X, ids, layer, threads):
    _use_threads(threads)
    return layer.forward_batch(X, ids[:, 0])


def forward_batch(client: distributed.Client, layer: LoraLinear | MultiLoraLinear,
                  X: dask.array.Array, adapter_ids: dask.array.Array | ArrayLike | None = None,
                  *, threads: int | None = None) -> dask.array.Array:
    """A layer's ``forward_batch`` over the row chunks of a dask array, lazily.

    The layer is scattered to every worker once (``client.scatter(layer,
    broadcast=True)``); the task of each row chunk refers to it by key, so
    what travels per chunk is the chunk's rows and its output, never W.
    Each task sets its Numba and BLAS threads (see :func:`thread_counts`)
    before it computes.

    Parameters
    ----------
    client : distributed.Client
        A client of the cluster the tasks will run on.
    layer : LoraLinear or MultiLoraLinear
        Anything with ``forward_batch(X)`` (or ``forward_batch(X, ids)``
        with ``adapter_ids``), ``in_features``, ``out_features`` and
        ``dtype``, that pickles.
    X : dask.array.Array, shape (rows, in_features)
        Chunked along rows (columns are rechunked to one chunk).
    adapter_ids : dask.array.Array or ndarray of int, shape (rows,), optional
        For a :class:`~numba_lora.MultiLoraLinear`: each row's adapter index
        (``-1`` for the base weight only); rechunked to X's row chunks.
    threads : int or None
        Numba and BLAS threads per task; None: :func:`thread_counts`.

    Returns
    -------
    dask.array.Array, shape (rows, out_features)
        Lazy: ``.compute()``, ``.persist()`` or ``.store(...)`` it.  The
        scattered layer stays on the workers as long as this array (or
        anything computed from it) is referenced.

    Raises
    ------
    LoraEnvironmentError
        If dask or distributed is not installed.
    LoraTypeError
        If ``X`` is not a dask array, or ``threads`` not None or an int >= 1.
    LoraShapeError
        If ``X`` is not (rows, in_features) or ``adapter_ids`` not (rows,).

    See Also
    --------
    numba_lora.LoraLinear.forward_batch : The same in one process.
    numba_lora.MultiLoraLinear.forward_batch : The per-row adapters.

    Examples
    --------
    >>> import dask.array as da
    >>> import numpy as np
    >>> from distributed import Client
    >>> from numba_lora import LoraLinear, distributed
    >>> client = Client(processes=False, n_workers=1, threads_per_worker=1,
    ...                 dashboard_address=None)
    >>> rng = np.random.default_rng(0)
    >>> layer = LoraLinear(rng.standard_normal((8, 4)), rank=2, alpha=4.0, seed=0)
    >>> X = da.from_array(rng.standard_normal((10, 4)), chunks=(5, 4))
    >>> Y = distributed.forward_batch(client, layer, X).compute()
    >>> np.allclose(Y, layer.forward_batch(X.compute()))
    True
    >>> client.close()
    """
    da, _ = _dask()
    if not isinstance(X, da.Array):
        raise LoraTypeError(f"X must be a dask.array.Array, got {type(X).__name__}")
    if X.ndim != 2 or X.shape[1] != layer.in_features:
        raise LoraShapeError(
            f"X must be (rows, in_features) = (rows, {layer.in_features}), got {X.shape}")
    threads = _check_threads(client, threads)
    X = X.rechunk({1: -1})
    [layer_future] = client.scatter([layer], broadcast=True, hash=False)
    chunks = (X.chunks[0], (layer.out_features,))
    if adapter_ids is None:
        return X.map_blocks(_forward_block, layer_future, threads, chunks=chunks,
                            dtype=layer.dtype, name="numba_lora-forward_batch")
    if not isinstance(adapter_ids, da.Array):
        adapter_ids = np.asarray(adapter_ids)
    if adapter_ids.ndim != 1 or adapter_ids.shape[0] != X.shape[0]:
        raise LoraShapeError(
            f"adapter_ids must be (rows,) = ({X.shape[0]},), got {adapter_ids.shape}")
    if not isinstance(adapter_ids, da.Array):
        adapter_ids = da.from_array(adapter_ids, chunks=(X.chunks[0],))
    ids = adapter_ids.rechunk((X.chunks[0],))[:, None]
    return da.map_blocks(_forward_multi_block, X, ids, layer_future, threads, chunks=chunks,
                         dtype=layer.dtype, name="numba_lora-forward_batch_multi")


# ------------------------------------------------------------------- bench
def _first_row(block):
    return block[:1]


def bench(shape=(4096, 4096), rank=16, rows=16384, chunk=1024, workers=2,
          threads_per_worker=1, repeat=3):
    """Batch-inference throughput: a LocalCluster against one process on the same cores.

    One process runs ``layer.forward_batch`` over the rows, ``chunk`` at a
    time, with ``workers * threads_per_worker`` Numba and BLAS threads; the
    cluster (worker processes on 127.0.0.1) runs :func:`forward_batch` over
    the same number of rows, generated and kept on the workers, each chunk's
    output reduced to its first row there (so neither side ships outputs).
    The cluster's time includes scattering the layer.  Returns a dict of
    medians (seconds, rows per second, and their ratio).
    """
    import statistics

    da, dist = _dask()
    cores = workers * threads_per_worker
    out_features, in_features = shape
    rng = np.random.default_rng(0)
    from .layer import LoraLinear

    W = (rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(in_features)))
    layer = LoraLinear(W, rank, 2.0 * rank, seed=1)
    layer.lora_b = rng.standard_normal((out_features, rank), dtype=np.float32) * 0.01
    X = rng.random((rows, in_features), dtype=np.float32)
    buffer = np.empty((chunk, out_features), np.float32)
    single, cluster = [], []
    with dist.LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker,
                           processes=True, host="127.0.0.1", dashboard_address=None) as lc, \
            dist.Client(lc) as client:
        Xd = da.random.default_rng(0).random((rows, in_features), chunks=(chunk, in_features),
                                             dtype=np.float32).persist()
        dist.wait(Xd)
        forward_batch(client, layer, Xd[:chunk]).compute()  # warm the workers' kernels
        previous = set_num_threads(cores)
        layer.forward_batch(X[:chunk], out=buffer)
        try:
            for _ in range(repeat):
                start = time.perf_counter()
                for r0 in range(0, rows, chunk):
                    part = X[r0:r0 + chunk]
                    layer.forward_batch(part, out=buffer[:part.shape[0]])
                single.append(time.perf_counter() - start)
                start = time.perf_counter()
                forward_batch(client, layer, Xd).map_blocks(
                    _first_row, chunks=((1,) * len(Xd.chunks[0]), (out_features,))).compute()
                cluster.append(time.perf_counter() - start)
        finally:
            set_num_threads(previous)
    one, many = statistics.median(single), statistics.median(cluster)
    return {"shape": list(shape), "rank": rank, "rows": rows, "chunk": chunk, "workers": workers,
            "threads_per_worker": threads_per_worker, "single_s": one, "cluster_s": many,
            "single_rows_per_s": rows / one, "cluster_rows_per_s": rows / many,
            "cluster_vs_single": one / many, "single_all": single, "cluster_all": cluster}


def main(argv=None):
    """``python -m numba_lora.distributed``: the batch-inference bench; prints JSON."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m numba_lora.distributed",
                                description=bench.__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="4096x4096")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads-per-worker", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    report = bench(shape, args.rank, args.rows, args.chunk, args.workers,
                   args.threads_per_worker, args.repeat)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    # Through the package, so that the tasks' functions pickle by reference.
    from numba_lora.distributed import main as _main

    _main()
