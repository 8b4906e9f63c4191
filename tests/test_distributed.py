"""numba_lora.distributed on a LocalCluster of two worker processes (skipped without dask).

The cluster listens on 127.0.0.1 only, has no dashboard, and is started and
closed by this module.  Arrays are tiny: what is tested is the partitioning
(one task per shard, row chunks, the layer shipped once, thread counts), not
speed.
"""

import pickle
import sys

import numpy as np
import pytest

import numba_lora
from numba_lora import (LoraEnvironmentError, LoraFormatError, LoraKeyError, LoraLinear, LoraShapeError, LoraTypeError,
                        MultiLoraLinear, checkpoint, distributed)

from .checkpoint.helpers import FIXTURES

try:
    import dask.array as da
    from distributed import Client, LocalCluster
except ImportError:
    da = None


def test_without_dask_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(LoraEnvironmentError, match=r"pip install \"numba_lora\[dask\]\""):
        distributed.merge(None, "base", "adapter", "out")


@pytest.fixture(scope="module")
def client():
    if da is None:
        pytest.skip('dask and distributed are not installed (pip install "numba_lora[dask]")')
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_thread_counts_share_the_cores(client):
    counts = distributed.thread_counts(client)
    assert len(counts) == 2
    cores = distributed._cores()  # the workers run on this machine
    assert all(n == max(1, cores // 2) for n in counts.values())


@pytest.mark.parametrize("model,tag", [("llama", "bf16"), ("gpt2", "f32")])
def test_merge_is_the_single_process_merge(client, tmp_path, model, tag):
    base, adapter = FIXTURES / f"{model}_{tag}", FIXTURES / f"{model}_adapter"
    alone = checkpoint.merge(base, adapter, tmp_path / "alone")
    result = distributed.merge(client, base, adapter, tmp_path / "dask")
    assert _files(tmp_path / "dask") == _files(tmp_path / "alone")
    assert (result.shards, result.merged, result.copied, result.bytes) == \
        (alone.shards, alone.merged, alone.copied, alone.bytes)



def test_unsynced_merge_is_the_same_files_and_reaches_the_workers(client, tmp_path, monkeypatch):
    base, adapter = FIXTURES / "llama_bf16", FIXTURES / "llama_adapter"
    with pytest.raises(LoraTypeError, match="sync must be True or False"):
        distributed.merge(client, base, adapter, tmp_path / "refused", sync="no")
    assert not (tmp_path / "refused").exists()
    submitted = []
    submit = client.submit

    def recording_submit(function, *args, **kwargs):
        submitted.append(args[-1])  # _write_shard_task(shard, plan, directory, threads, sync)
        return submit(function, *args, **kwargs)

    monkeypatch.setattr(client, "submit", recording_submit)
    distributed.merge(client, base, adapter, tmp_path / "dask", sync=False)
    assert submitted and set(submitted) == {False}
    checkpoint.merge(base, adapter, tmp_path / "alone")
    assert _files(tmp_path / "dask") == _files(tmp_path / "alone")

def test_weighted_merge_is_the_single_process_merge(client, tmp_path):
    weighted = FIXTURES.parent / "peft_weighted"
    base, adapters = FIXTURES / "llama_bf16", [weighted / "adapter_c", weighted / "adapter_d"]
    checkpoint.merge(base, adapters, tmp_path / "alone", weights=[0.5, -2.0],
                     combination="cat")
    distributed.merge(client, base, adapters, tmp_path / "dask", weights=[0.5, -2.0],
                      combination="cat")
    assert _files(tmp_path / "dask") == _files(tmp_path / "alone")


def test_merge_with_relative_paths(client, tmp_path, monkeypatch):
    # The workers' working directory is not the client's after a chdir.
    monkeypatch.chdir(tmp_path)
    result = distributed.merge(client, FIXTURES / "gpt2_bf16", FIXTURES / "gpt2_adapter",
                               "merged")
    assert result.out == tmp_path / "merged"
    alone = checkpoint.merge(FIXTURES / "gpt2_bf16", FIXTURES / "gpt2_adapter", "alone")
    assert _files(tmp_path / "merged") == _files(tmp_path / "alone")
    assert alone.out.name == "alone"


def test_merge_refusals_and_task_failures_leave_nothing(client, tmp_path, monkeypatch):
    with pytest.raises(LoraKeyError, match="transformer.h.0.attn.c_attn"):
        distributed.merge(client, FIXTURES / "llama_bf16", FIXTURES / "gpt2_adapter",
                          tmp_path / "out")
    # A shard that changes after the client checked it fails on a worker.
    base = tmp_path / "base"
    base.mkdir()
    for path in (FIXTURES / "llama_f32").iterdir():
        (base / path.name).write_bytes(path.read_bytes())
    plan = checkpoint.plan_merge(base, FIXTURES / "llama_adapter")
    original = checkpoint.plan_merge

    def plan_then_change(*args, **kwargs):
        planned = original(*args, **kwargs)
        shard = base / plan.shards[-1]
        shard.write_bytes(shard.read_bytes() + b"\0")
        return planned

    monkeypatch.setattr(distributed.checkpoint, "plan_merge", plan_then_change)
    with pytest.raises(LoraFormatError, match="changed size"):
        distributed.merge(client, base, FIXTURES / "llama_adapter", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_forward_batch_over_row_chunks(client, rng):
    W = rng.standard_normal((96, 64)).astype(np.float32)
    layer = LoraLinear(W, 4, 8.0, seed=1)
    layer.lora_b = rng.standard_normal((96, 4)) * 0.1
    X = rng.standard_normal((101, 64)).astype(np.float32)
    result = distributed.forward_batch(client, layer, da.from_array(X, chunks=(25, 32)))
    assert result.chunks == ((25, 25, 25, 25, 1), (96,)) and result.dtype == np.float32
    # The layer travels once, by key: the five tasks together are smaller than W.
    tasks = dict(result.__dask_graph__().layers[result.name])
    assert len(tasks) == 5 and len(pickle.dumps(tasks)) < W.nbytes / 2
    np.testing.assert_allclose(result.compute(), layer.forward_batch(X), rtol=1e-5, atol=1e-5)
    # Every task set its threads: one each (two single-threaded workers here).
    expected = max(1, distributed._cores() // 2)
    counts = client.gather(client.map(lambda _: numba_lora.get_num_threads(), range(4),
                                      pure=False))
    assert all(c[0] == expected and c[1] in (expected, None) for c in counts)


def test_forward_batch_multi_with_ids(client, rng):
    W = rng.standard_normal((20, 12)).astype(np.float32)
    layer = MultiLoraLinear(W)
    for name, rank in (("a", 2), ("b", 3)):
        layer.add_adapter(name, rng.standard_normal((rank, 12)), rng.standard_normal((20, rank)),
                          alpha=4.0)
    X = rng.standard_normal((50, 12)).astype(np.float32)
    ids = rng.integers(-1, 2, 50)
    result = distributed.forward_batch(client, layer, da.from_array(X, chunks=(16, 12)),
                                       da.from_array(ids, chunks=7), threads=1)
    np.testing.assert_allclose(result.compute(), layer.forward_batch(X, ids), rtol=1e-5,
                               atol=1e-5)
    result = distributed.forward_batch(client, layer, da.from_array(X, chunks=(16, 12)), ids)
    np.testing.assert_allclose(result.compute(), layer.forward_batch(X, ids), rtol=1e-5,
                               atol=1e-5)


def test_forward_batch_refusals(client):
    layer = LoraLinear(np.zeros((4, 3), np.float32), 1, 1.0)
    with pytest.raises(LoraTypeError, match="dask.array"):
        distributed.forward_batch(client, layer, np.zeros((2, 3), np.float32))
    with pytest.raises(LoraShapeError, match="in_features"):
        distributed.forward_batch(client, layer, da.zeros((2, 5), chunks=1))
    with pytest.raises(LoraShapeError, match="adapter_ids"):
        distributed.forward_batch(client, layer, da.zeros((2, 3), chunks=1), np.zeros(3, int))
    with pytest.raises(LoraTypeError, match="threads"):
        distributed.forward_batch(client, layer, da.zeros((2, 3), chunks=1), threads=0)
