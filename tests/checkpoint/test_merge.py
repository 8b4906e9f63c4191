"""checkpoint.merge on small synthetic checkpoints: what it refuses, and that a failure writes nothing."""

import json
import os
import pickle
import sys
import time
import types

import numpy as np
import pytest

from numba_lora import (LoraConfigError, LoraFormatError, LoraKeyError, LoraTypeError,
                        LoraUnsupportedError, checkpoint, kernels)
from numba_lora.checkpoint import _write

from .helpers import (as_array, checkpoint_tensors, merged_half_reference, raw_tensors,
                      round_bf16_reference, write_adapter, write_checkpoint, write_safetensors)

Q, K, NORM, HEAD = ("model.layers.0.q.weight", "model.layers.0.k.weight", "model.norm.weight",
                    "lm_head.weight")


def _base_tensors(rng, dtype=np.float32):
    q = rng.standard_normal((8, 6)).astype(dtype)
    k = ("BF16", round_bf16_reference(rng.standard_normal(24).astype(np.float32)).reshape(4, 6))
    return [{Q: q, NORM: np.ones(6, np.float32)}, {K: k, HEAD: rng.standard_normal((5, 6))
                                                   .astype(np.float32)}]


def _factors(rng):
    return {"model.layers.0.q": (rng.standard_normal((2, 6)).astype(np.float32),
                                 rng.standard_normal((8, 2)).astype(np.float32)),
            "model.layers.0.k": (rng.standard_normal((2, 6)).astype(np.float32),
                                 rng.standard_normal((4, 2)).astype(np.float32))}


@pytest.fixture
def pair(tmp_path, rng):
    """(base directory, adapter directory, factors) of a two-shard float32 + bf16 checkpoint."""
    factors = _factors(rng)
    base = write_checkpoint(tmp_path / "base", _base_tensors(rng),
                            extra_files={"tokenizer.json": "{}"})
    adapter = write_adapter(tmp_path / "adapter", factors, lora_alpha=3, use_rslora=True)
    return base, adapter, factors


def _expected(base, factors, scaling):
    tensors = checkpoint_tensors(base)
    q = as_array(tensors[Q]).copy()
    A, B = factors["model.layers.0.q"]
    kernels.merge(q, A, B, scaling)
    A, B = factors["model.layers.0.k"]
    k = merged_half_reference(as_array(tensors[K]), A, B, scaling, "bf16")
    return q, k


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if "partial" in p.name or p.name.endswith(".tmp"))


def test_merge_writes_the_merged_tensors(tmp_path, pair):
    base, adapter, factors = pair
    result = checkpoint.merge(base, adapter, tmp_path / "out")
    q, k = _expected(base, factors, 3 / np.sqrt(2))
    ours = checkpoint_tensors(tmp_path / "out")
    np.testing.assert_array_equal(as_array(ours[Q]), q)
    np.testing.assert_array_equal(as_array(ours[K]), k)
    assert ours[NORM] == checkpoint_tensors(base)[NORM]
    assert result.merged == (Q, K)
    assert result.copied == ("model.safetensors.index.json", "config.json", "tokenizer.json")
    assert result.out == tmp_path / "out" and result.bytes_per_second > 0
    assert _leftovers(tmp_path) == []


def test_single_file_and_float64_checkpoint(tmp_path, rng):
    W = rng.standard_normal((8, 6))
    base = write_checkpoint(tmp_path / "base", [{Q: W}], index=False)
    A, B = rng.standard_normal((2, 6)), rng.standard_normal((8, 2))
    adapter = write_adapter(tmp_path / "adapter", {"model.layers.0.q": (A, B)})
    result = checkpoint.merge(base, adapter, tmp_path / "out")
    assert result.shards == ("model.safetensors",) and result.copied == ("config.json",)
    expected = W.copy()
    kernels.merge(expected, A, B, 2.0)
    np.testing.assert_array_equal(as_array(raw_tensors(tmp_path / "out" / "model.safetensors")[Q]),
                                  expected)


def test_float16_weights_and_bf16_factors(tmp_path, rng):
    W = (rng.standard_normal((8, 6)) * 0.1).astype(np.float16)
    base = write_checkpoint(tmp_path / "base", [{Q: W}], index=False)
    A = rng.standard_normal((2, 6)).astype(np.float32)
    B = rng.standard_normal((8, 2)).astype(np.float32)
    A16, B16 = (round_bf16_reference(A).reshape(A.shape), round_bf16_reference(B).reshape(B.shape))
    adapter = tmp_path / "adapter"
    write_adapter(adapter, {"model.layers.0.q": (A, B)})
    write_safetensors(adapter / "adapter_model.safetensors", {
        "base_model.model.model.layers.0.q.lora_A.weight": ("BF16", A16),
        "base_model.model.model.layers.0.q.lora_B.weight": ("BF16", B16)})
    checkpoint.merge(base, adapter, tmp_path / "out")
    widened = [(x.astype(np.uint32) << 16).view(np.float32) for x in (A16, B16)]
    expected = merged_half_reference(W.view(np.uint16), *widened, 2.0, "f16")
    got = raw_tensors(tmp_path / "out" / "model.safetensors")[Q]
    np.testing.assert_array_equal(as_array(got), expected)


@pytest.mark.parametrize("gap,trailing,match", [(5, 0, "leaving a hole"),
                                                (0, 3, "3 bytes after its last tensor")])
def test_holes_and_trailing_bytes_are_refused(tmp_path, rng, gap, trailing, match):
    # As the safetensors format and library refuse them.
    base = tmp_path / "base"
    base.mkdir()
    write_safetensors(base / "model.safetensors",
                      {NORM: np.ones(6, np.float32), Q: rng.standard_normal((8, 6)).astype(np.float32)},
                      gap=gap)
    path = base / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes((data[:-gap] if gap else data) + b"\0" * trailing)
    adapter = write_adapter(tmp_path / "adapter", {k: v for k, v in _factors(rng).items()
                                                   if k.endswith("q")})
    with pytest.raises(LoraFormatError, match=match) as info:
        checkpoint.merge(base, adapter, tmp_path / "out")
    assert "model.safetensors" in str(info.value)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------- refusals
def _mutations():
    def adapter_extra_module(base, adapter, rng):
        write_adapter(adapter, {**_factors(rng), "model.layers.0.v": (np.ones((2, 6), np.float32),
                                                                      np.ones((8, 2), np.float32))})

    def shape(base, adapter, rng):
        f = _factors(rng)
        f["model.layers.0.q"] = (np.ones((2, 7), np.float32), np.ones((8, 2), np.float32))
        write_adapter(adapter, f)

    def int_weight(base, adapter, rng):
        tensors = _base_tensors(rng)
        tensors[0][Q] = np.ones((8, 6), np.int32)
        write_checkpoint(base, tensors)

    def missing_shard(base, adapter, rng):
        (base / "model-00002-of-00002.safetensors").unlink()

    def traversal(base, adapter, rng):
        index = json.loads((base / "model.safetensors.index.json").read_text())
        index["weight_map"][K] = "../model-00002-of-00002.safetensors"
        (base / "model.safetensors.index.json").write_text(json.dumps(index))

    def wrong_shard(base, adapter, rng):
        index = json.loads((base / "model.safetensors.index.json").read_text())
        index["weight_map"][K] = "model-00001-of-00002.safetensors"
        (base / "model.safetensors.index.json").write_text(json.dumps(index))

    def unlisted(base, adapter, rng):
        index = json.loads((base / "model.safetensors.index.json").read_text())
        del index["weight_map"][HEAD]
        (base / "model.safetensors.index.json").write_text(json.dumps(index))

    def overlap(base, adapter, rng):
        path = base / "model-00002-of-00002.safetensors"
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        head = json.loads(data[8:8 + n])
        head[HEAD]["data_offsets"] = [0, head[HEAD]["data_offsets"][1] - head[HEAD]["data_offsets"][0]]
        body = data[8 + n:]
        text = json.dumps(head).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(len(text).to_bytes(8, "little") + text + body)

    def truncated(base, adapter, rng):
        path = base / "model-00001-of-00002.safetensors"
        path.write_bytes(path.read_bytes()[:-4])

    def two_modules(base, adapter, rng):
        f = _factors(rng)
        f["layers.0.q"] = f["model.layers.0.q"]
        write_adapter(adapter, f, lora_alpha=3)

    def rank(base, adapter, rng):
        write_adapter(adapter, _factors(rng), r=4)

    def dora(base, adapter, rng):
        write_adapter(adapter, _factors(rng), use_dora=True)

    def no_checkpoint(base, adapter, rng):
        for p in base.glob("model*"):
            p.unlink()

    def two_indexes(base, adapter, rng):
        (base / "other.safetensors.index.json").write_text("{}")

    def bad_index(base, adapter, rng):
        (base / "model.safetensors.index.json").write_text('{"weight_map": [1]}')

    return [
        (adapter_extra_module, LoraKeyError, ["adapter_model.safetensors", "'model.layers.0.v'"]),
        (shape, LoraFormatError, ["model-00001-of-00002.safetensors", f"tensor '{Q}'", "(8, 7)"]),
        (int_weight, LoraFormatError, [f"tensor '{Q}'", "dtype I32"]),
        (missing_shard, LoraFormatError, ["model-00002-of-00002.safetensors", "does not exist"]),
        (traversal, LoraFormatError, ["not a plain file name"]),
        (wrong_shard, LoraFormatError, [K]),
        (unlisted, LoraFormatError, [HEAD, "does not list it"]),
        (overlap, LoraFormatError, ["overlap", HEAD]),
        (truncated, LoraFormatError, ["model-00001-of-00002.safetensors"]),
        (two_modules, LoraFormatError, ["both adapt", Q]),
        (rank, LoraFormatError, ["rank 2", "rank 4"]),
        (dora, LoraUnsupportedError, ["use_dora"]),
        (no_checkpoint, LoraFormatError, ["no safetensors checkpoint"]),
        (two_indexes, LoraFormatError, ["2 safetensors index files"]),
        (bad_index, LoraFormatError, ["weight_map"]),
    ]


@pytest.mark.parametrize("mutate,error,words", _mutations(), ids=lambda v: getattr(v, "__name__", ""))
def test_refused_before_anything_is_written(tmp_path, pair, rng, mutate, error, words):
    base, adapter, _ = pair
    mutate(base, adapter, rng)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(error) as info:
        checkpoint.merge(base, adapter, tmp_path / "new" / "out")
    for word in words:
        assert word in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(dtype="bfloat16"), LoraConfigError, "dtype must be 'keep'"),
    (dict(dtype=None), LoraConfigError, "dtype must be 'keep'"),
    (dict(progress="yes"), LoraTypeError, "progress must be"),
])
def test_bad_options(tmp_path, pair, kwargs, error, match):
    base, adapter, _ = pair
    with pytest.raises(error, match=match):
        checkpoint.merge(base, adapter, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_bad_paths(tmp_path, pair):
    base, adapter, _ = pair
    with pytest.raises(LoraTypeError, match="base must be a str or os.PathLike"):
        checkpoint.merge(123, adapter, tmp_path / "out")
    with pytest.raises(LoraFormatError, match="is not a directory"):
        checkpoint.merge(base / "config.json", adapter, tmp_path / "out")
    with pytest.raises(LoraFormatError, match="has no adapter_config.json"):
        checkpoint.merge(base, base, tmp_path / "out")


def test_out_must_be_new_or_empty_and_not_an_input(tmp_path, pair):
    base, adapter, _ = pair
    files = {p: p.read_bytes() for p in list(base.iterdir()) + list(adapter.iterdir())}
    with pytest.raises(LoraConfigError, match="base checkpoint's own directory"):
        checkpoint.merge(base, adapter, base)
    with pytest.raises(LoraConfigError, match="base checkpoint's own directory"):
        checkpoint.merge(base, adapter, base / ".." / "base")
    with pytest.raises(LoraConfigError, match="adapter's own directory"):
        checkpoint.merge(base, adapter, adapter)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(LoraConfigError, match="is not empty"):
        checkpoint.merge(base, adapter, tmp_path / "full")
    with pytest.raises(LoraConfigError, match="not a directory"):
        checkpoint.merge(base, adapter, tmp_path / "full" / "x")
    with pytest.raises(LoraConfigError, match="x exists and is not a directory"):
        checkpoint.merge(base, adapter, tmp_path / "full" / "x" / "y" / "z")
    assert {p: p.read_bytes() for p in files} == files
    assert (tmp_path / "full" / "x").read_text() == "x"
    (tmp_path / "empty").mkdir()
    checkpoint.merge(base, adapter, tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors.index.json").is_file()
    checkpoint.merge(base, adapter, tmp_path / "a" / "b" / "c")
    assert (tmp_path / "a" / "b" / "c" / "config.json").is_file()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["kernel", "second shard", "commit", "interrupt"])
def test_a_failure_leaves_nothing(tmp_path, pair, monkeypatch, where):
    base, adapter, _ = pair
    calls = []

    def failing_kernel(W, A, B, scaling):
        raise (KeyboardInterrupt if where == "interrupt" else RuntimeError)("boom")

    if where in ("kernel", "interrupt"):
        monkeypatch.setitem(_write._KERNELS, "BF16",
                            (np.uint16, failing_kernel, failing_kernel, np.float32))
    elif where == "second shard":
        for sink in (_write._Copier, _write._DirectSink):  # buffered and O_DIRECT writes
            def copy(self, offset, count, real=sink.copy):
                calls.append(self.path.name)
                if "00002" in self.path.name:
                    raise OSError(28, "No space left on device")
                real(self, offset, count)

            monkeypatch.setattr(sink, "copy", copy)
    else:
        def copyfile(src, dst):
            raise OSError(13, "Permission denied")

        monkeypatch.setattr(_write.shutil, "copyfile", copyfile)
    error = KeyboardInterrupt if where == "interrupt" else (RuntimeError if where == "kernel"
                                                            else OSError)
    with pytest.raises(error):
        checkpoint.merge(base, adapter, tmp_path / "new" / "deeper" / "out")
    assert not (tmp_path / "new").exists()
    assert _leftovers(tmp_path) == []
    if where == "second shard":
        assert "model-00001-of-00002.safetensors" in calls


def test_other_files_symlinks_and_skipped_entries(tmp_path, pair):
    base, adapter, _ = pair
    # A hub-cache snapshot: every file a symbolic link to a blob elsewhere.
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for path in base.iterdir():
        (blobs / path.name).write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(blobs / path.name)
    (snapshot / "original").mkdir()
    (snapshot / "pytorch_model.bin").write_bytes(b"stale")
    (snapshot / "pytorch_model.bin.index.json").write_text("{}")
    result = checkpoint.merge(snapshot, adapter, tmp_path / "out")
    assert dict(result.skipped) == {"original": "not a regular file",
                                    "pytorch_model.bin": "weights outside the merged checkpoint",
                                    "pytorch_model.bin.index.json":
                                        "weights outside the merged checkpoint"}
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base.iterdir())
    assert not any(p.is_symlink() for p in out.iterdir())
    reference = checkpoint.merge(base, adapter, tmp_path / "reference")
    for name in reference.shards:
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()


def test_without_copy_file_range(tmp_path, pair, monkeypatch):
    base, adapter, _ = pair
    checkpoint.merge(base, adapter, tmp_path / "kernel")

    def refuse(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    checkpoint.merge(base, adapter, tmp_path / "refused")
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    checkpoint.merge(base, adapter, tmp_path / "absent")
    for name in ("refused", "absent"):
        for path in (tmp_path / "kernel").iterdir():
            assert (tmp_path / name / path.name).read_bytes() == path.read_bytes()


def test_progress_bar(tmp_path, pair, monkeypatch):
    base, adapter, _ = pair
    updates = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total = total

        def update(self, n):
            updates.append(n)

        def set_description(self, text):
            updates.append(text)

        def close(self):
            updates.append("closed")

    fake = types.ModuleType("tqdm.auto")
    fake.tqdm = Bar
    monkeypatch.setitem(sys.modules, "tqdm", types.ModuleType("tqdm"))
    monkeypatch.setitem(sys.modules, "tqdm.auto", fake)
    result = checkpoint.merge(base, adapter, tmp_path / "out", progress=True)
    assert sum(n for n in updates if isinstance(n, int)) == result.bytes
    assert updates[-1] == "closed" and result.shards[0] in updates
    updates.clear()
    checkpoint.merge(base, adapter, tmp_path / "quiet", progress=False)
    checkpoint.merge(base, adapter, tmp_path / "auto")  # stderr is not a terminal under pytest
    assert updates == []
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # not installed: no bar, no error
    checkpoint.merge(base, adapter, tmp_path / "missing", progress=True)


def test_plan_pickles_and_shards_write_alone(tmp_path, pair):
    base, adapter, _ = pair
    plan = checkpoint.plan_merge(base, adapter)
    assert pickle.loads(pickle.dumps(plan)) == plan
    assert plan.shards == ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    assert [m.tensor for m in plan.merges] == [Q, K]
    reference = checkpoint.merge(base, adapter, tmp_path / "reference")
    (tmp_path / "alone").mkdir()
    for shard in reversed(plan.shards):
        assert checkpoint.write_shard(plan, shard, tmp_path / "alone") == (base / shard).stat().st_size
    for shard in reference.shards:
        assert (tmp_path / "alone" / shard).read_bytes() == (tmp_path / "reference" / shard).read_bytes()
    with pytest.raises(LoraConfigError, match="not a shard"):
        checkpoint.write_shard(plan, "nope.safetensors", tmp_path / "alone")


def test_a_base_changed_after_planning_is_refused(tmp_path, pair):
    base, adapter, _ = pair
    plan = checkpoint.plan_merge(base, adapter)
    shard = base / plan.shards[0]
    shard.write_bytes(shard.read_bytes() + b"\0" * 8)
    (tmp_path / "out").mkdir()
    with pytest.raises(LoraFormatError, match="changed size"):
        checkpoint.write_shard(plan, plan.shards[0], tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_same_bytes_with_the_threaded_kernels(tmp_path, pair, monkeypatch):
    # With Numba's count at n the kernels get n - 1 threads (the writer has
    # a core); pretend there are three so that the threaded kernels run too.
    base, adapter, _ = pair
    checkpoint.merge(base, adapter, tmp_path / "serial")
    real = _write.numba
    used = []

    class ThreeThreads:
        @staticmethod
        def get_num_threads():
            return 3

        @staticmethod
        def set_num_threads(n):
            used.append(n)
            real.set_num_threads(min(n, real.config.NUMBA_NUM_THREADS))

    monkeypatch.setattr(_write, "numba", ThreeThreads)
    checkpoint.merge(base, adapter, tmp_path / "threaded")
    assert used[0] == 2
    for path in (tmp_path / "serial").iterdir():
        assert (tmp_path / "threaded" / path.name).read_bytes() == path.read_bytes()


def test_a_failed_shard_stops_and_removes_the_others(tmp_path, pair, monkeypatch):
    # The first shard's writer fails while the second shard is under way:
    # both temporary files go, and so does the staging directory.
    base, adapter, _ = pair
    for sink in (_write._Copier, _write._DirectSink):  # buffered and O_DIRECT writes
        def copy(self, offset, count, real=sink.copy):
            if "00001" in self.path.name and offset > 0:
                raise OSError(5, "Input/output error")
            real(self, offset, count)

        monkeypatch.setattr(sink, "copy", copy)
    plan = checkpoint.plan_merge(base, adapter)
    (tmp_path / "staging").mkdir()
    with pytest.raises(OSError, match="Input/output error"):
        _write.run_shards(plan, plan.shards, tmp_path / "staging")
    assert list((tmp_path / "staging").iterdir()) == []
    (tmp_path / "link").symlink_to(tmp_path / "staging")
    with pytest.raises(LoraConfigError, match="symbolic link"):
        checkpoint.merge(base, adapter, tmp_path / "link")


def test_copying_through_user_space_with_concurrent_reads(tmp_path, rng, monkeypatch):
    # The writer's copies and the reader's tensor reads interleave in one
    # file: each thread must keep its own file position.
    tensors = {}
    factors = {}
    for i in range(6):
        tensors[f"model.layers.{i}.norm.weight"] = rng.standard_normal(3000).astype(np.float32)
        tensors[f"model.layers.{i}.q.weight"] = rng.standard_normal((64, 48)).astype(np.float32)
        factors[f"model.layers.{i}.q"] = (rng.standard_normal((2, 48)).astype(np.float32),
                                          rng.standard_normal((64, 2)).astype(np.float32))
    base = write_checkpoint(tmp_path / "base", [tensors], index=False)
    adapter = write_adapter(tmp_path / "adapter", factors)
    checkpoint.merge(base, adapter, tmp_path / "kernel")
    monkeypatch.setattr(_write, "DIRECT_IO", False)  # O_DIRECT writes read at explicit offsets
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    monkeypatch.setattr(_write, "_CHUNK", 512)

    def slow_read(src, offset, view, path, key):
        # Seek, then let the writer run before reading, as a preempted
        # thread would.
        src.seek(offset)
        time.sleep(0.002)
        got = 0
        while got < len(view):
            got += src.readinto(view[got:])

    real_write_all = _write._write_all

    def slow_write_all(dst, view):
        time.sleep(0.0005)
        real_write_all(dst, view)

    monkeypatch.setattr(_write, "_read_exactly", slow_read)
    monkeypatch.setattr(_write, "_write_all", slow_write_all)
    for k in range(3):
        checkpoint.merge(base, adapter, tmp_path / f"user{k}")
        assert (tmp_path / f"user{k}" / "model.safetensors").read_bytes() == \
            (tmp_path / "kernel" / "model.safetensors").read_bytes()


def test_a_writer_that_cannot_open_the_base_does_not_hang(tmp_path, rng, monkeypatch):
    # Three adapted tensors, two buffers: the calling thread needs a buffer
    # back from a writer that failed at its start.
    tensors, factors = {}, {}
    for i in range(3):
        tensors[f"model.layers.{i}.q.weight"] = rng.standard_normal((8, 6)).astype(np.float32)
        factors[f"model.layers.{i}.q"] = (rng.standard_normal((2, 6)).astype(np.float32),
                                          rng.standard_normal((8, 2)).astype(np.float32))
    base = write_checkpoint(tmp_path / "base", [tensors], index=False)
    adapter = write_adapter(tmp_path / "adapter", factors)
    real_open = open

    def writer_cannot_open(path, mode="r", *args, **kwargs):
        import threading

        if threading.current_thread().name.startswith("write ") and "r" in mode:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(_write, "open", writer_cannot_open, raising=False)
    with pytest.raises(PermissionError):
        checkpoint.merge(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("how", ["buffered", "direct refused at open", "direct refused at write"])
def test_every_way_of_writing_gives_the_same_bytes(tmp_path, pair, monkeypatch, how):
    # O_DIRECT where the file system takes it; otherwise (tmpfs refuses it at
    # open, some file systems at the first write) buffered writes, same bytes.
    base, adapter, _ = pair
    reference = checkpoint_tensors(checkpoint.merge(base, adapter, tmp_path / "ref").out)
    import errno

    if how == "buffered":
        monkeypatch.setattr(_write, "DIRECT_IO", False)
    elif how == "direct refused at open" and hasattr(os, "O_DIRECT"):
        real_open = os.open

        def refusing_open(path, flags, *args):
            if flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(path, flags, *args)

        monkeypatch.setattr(_write.os, "open", refusing_open)
    elif hasattr(os, "O_DIRECT"):
        real_pwrite, refused = os.pwrite, []

        def refusing_pwrite(fd, data, offset):
            import fcntl

            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                refused.append(offset)
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(_write.os, "pwrite", refusing_pwrite)
    result = checkpoint.merge(base, adapter, tmp_path / "out")
    assert checkpoint_tensors(result.out) == reference
    for shard in result.shards:
        assert (result.out / shard).read_bytes() == (tmp_path / "ref" / shard).read_bytes()
    if how == "direct refused at write" and hasattr(os, "O_DIRECT"):
        assert refused and set(refused) == {0}  # one refusal per shard, then buffered
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("chunk", [4096, 8192, 3 * 4096])
def test_direct_writes_across_many_small_chunks(tmp_path, pair, monkeypatch, chunk):
    # Tensors and unchanged ranges cross chunk boundaries at every offset
    # the fixture has; the last chunk is padded and cut back.
    base, adapter, _ = pair
    monkeypatch.setattr(_write, "DIRECT_IO", False)
    reference = checkpoint.merge(base, adapter, tmp_path / "ref")
    monkeypatch.setattr(_write, "DIRECT_IO", True)
    monkeypatch.setattr(_write, "_DIRECT_CHUNK", chunk)
    result = checkpoint.merge(base, adapter, tmp_path / "out")
    for shard in result.shards:
        data = (result.out / shard).read_bytes()
        assert data == (reference.out / shard).read_bytes()
        assert len(data) == (base / shard).stat().st_size  # the padding is cut off
