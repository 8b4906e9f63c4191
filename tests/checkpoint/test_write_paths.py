"""The ways a shard can be written (O_DIRECT, mapped, buffered; synced or not) give the same bytes.

Each way is chosen by ``numba_lora.checkpoint._write``'s switches (``DIRECT_IO``,
``MAP_WRITES``), by ``merge(sync=...)`` and by what the operating system refuses; every one
must write the bytes of the reference (float32 merges by the float32 kernel,
half-precision ones rounded once), and a failure in any of them must leave
nothing behind.
"""

import errno
import mmap
import os

import numpy as np
import pytest

from numba_lora import checkpoint, kernels
from numba_lora.checkpoint import _write

from .helpers import (as_array, checkpoint_tensors, merged_half_reference,
                      round_bf16_reference, write_adapter, write_checkpoint)

# Tensors of a few pages each, at offsets that are not page-aligned, so that
# a mapping starts before its tensor and chunks end inside tensors.
F32_Q, BF16_Q, F16_K, NORM = ("model.layers.0.q.weight", "model.layers.1.q.weight",
                              "model.layers.0.k.weight", "model.norm.weight")
BF16_K, HEAD = "model.layers.1.k.weight", "lm_head.weight"
SHAPES = {F32_Q: (40, 70), BF16_Q: (64, 70), F16_K: (30, 70), BF16_K: (70, 64)}

#: (DIRECT_IO, MAP_WRITES, sync) of each way through the page cache or not.
WAYS = {
    "direct": (True, True, True),
    "mapped": (False, True, True),
    "buffered": (False, False, True),
    "mapped, not synced": (False, True, False),
    "buffered, not synced": (False, False, False),
    # sync off means no O_DIRECT, whatever DIRECT_IO says.
    "direct asked, not synced": (True, True, False),
}


@pytest.fixture
def case(tmp_path, rng):
    """(base, adapter, expected {name: bytes}) of a two-shard float32/bf16/f16 checkpoint."""
    def bf16(shape):
        return ("BF16", round_bf16_reference(rng.standard_normal(shape).astype(np.float32))
                .reshape(shape))

    tensors = [
        {F32_Q: rng.standard_normal(SHAPES[F32_Q]).astype(np.float32),
         NORM: rng.standard_normal(300).astype(np.float32),
         BF16_Q: bf16(SHAPES[BF16_Q]),
         F16_K: rng.standard_normal(SHAPES[F16_K]).astype(np.float16)},
        {BF16_K: bf16(SHAPES[BF16_K]),
         HEAD: rng.standard_normal((50, 70)).astype(np.float32)},
    ]
    factors = {name[:-len(".weight")]: (rng.standard_normal((2, shape[1])).astype(np.float32),
                                        rng.standard_normal((shape[0], 2)).astype(np.float32))
               for name, shape in SHAPES.items()}
    base = write_checkpoint(tmp_path / "base", tensors)
    adapter = write_adapter(tmp_path / "adapter", factors)  # r 2, alpha 4: scaling 2
    stored = checkpoint_tensors(base)
    expected = {name: data for name, (_, _, data) in stored.items()}
    for name in SHAPES:
        A, B = factors[name[:-len(".weight")]]
        code = stored[name][0]
        W = as_array(stored[name]).copy()
        if code == "F32":
            kernels.merge(W, A, B, 2.0)
        else:
            W = merged_half_reference(W, A, B, 2.0, "bf16" if code == "BF16" else "f16")
        expected[name] = W.astype(W.dtype.newbyteorder("<")).tobytes()
    return base, adapter, expected


def _set(monkeypatch, way):
    """Set ``way``'s switches; return its ``sync`` for :func:`_merge`."""
    direct, mapped, sync = WAYS[way]
    monkeypatch.setattr(_write, "DIRECT_IO", direct)
    monkeypatch.setattr(_write, "MAP_WRITES", mapped)
    return sync


def _merge(base, adapter, out, sync=True, **kw):
    return checkpoint.merge(base, adapter, out, sync=sync, **kw)


def _check(result, base, expected):
    got = checkpoint_tensors(result.out)
    assert {name: data for name, (_, _, data) in got.items()} == expected
    for shard in result.shards:  # header and layout as the base's
        ours, theirs = (result.out / shard).read_bytes(), (base / shard).read_bytes()
        assert len(ours) == len(theirs)
        n = int.from_bytes(theirs[:8], "little")
        assert ours[:8 + n] == theirs[:8 + n]


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir()
                  if "partial" in p.name or p.name.endswith(".tmp"))


@pytest.mark.parametrize("way", sorted(WAYS))
def test_every_way_writes_the_reference_bytes(tmp_path, case, monkeypatch, way):
    base, adapter, expected = case
    sync = _set(monkeypatch, way)
    result = _merge(base, adapter, tmp_path / "out", sync)
    _check(result, base, expected)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("sync", [True, False])
def test_sync_off_leaves_the_shards_unsynced(tmp_path, case, monkeypatch, sync):
    # Synced: one fsync per shard (and the directories'); not synced: only
    # the directories', so the renames are still ordered after the writes.
    base, adapter, expected = case
    _set(monkeypatch, "mapped" if sync else "mapped, not synced")
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}") if os.path.isdir("/proc/self/fd")
                      else None)
        real_fsync(fd)

    monkeypatch.setattr(_write.os, "fsync", fsync)
    result = _merge(base, adapter, tmp_path / "out", sync)
    _check(result, base, expected)
    files = [d for d in synced if d is False]
    if os.path.isdir("/proc/self/fd"):
        assert len(files) == (len(result.shards) if sync else 0)


@pytest.mark.parametrize("refusal", [errno.EINVAL, errno.ENOSYS])
def test_a_kernel_without_populate_write_gets_written_bytes(tmp_path, case, monkeypatch,
                                                            refusal):
    # Older kernels refuse MADV_POPULATE_WRITE: each tensor is then merged in
    # a buffer and written over its copy, never touched through a mapping
    # that could fault.
    base, adapter, expected = case
    sync = _set(monkeypatch, "mapped")

    class Refusing(mmap.mmap):
        def madvise(self, *args):
            raise OSError(refusal, os.strerror(refusal))

        def __getitem__(self, key):  # never read through the mapping
            raise AssertionError("read through a mapping that was not pre-faulted")

    monkeypatch.setattr(_write.mmap, "mmap", Refusing)
    result = _merge(base, adapter, tmp_path / "out", sync)
    _check(result, base, expected)


def test_a_page_that_cannot_be_made_writable_is_an_error(tmp_path, case, monkeypatch):
    # MADV_POPULATE_WRITE reports what would be SIGBUS (disk full on a
    # copy-on-write file system, an I/O error) as an error: raised, nothing left.
    base, adapter, _ = case
    sync = _set(monkeypatch, "mapped")

    class Failing(mmap.mmap):
        def madvise(self, *args):
            raise OSError(errno.EFAULT, "Bad address")

    monkeypatch.setattr(_write.mmap, "mmap", Failing)
    with pytest.raises(OSError, match="Bad address"):
        _merge(base, adapter, tmp_path / "out", sync)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("way", ["mapped", "mapped, not synced", "buffered"])
def test_without_copy_file_range(tmp_path, case, monkeypatch, way):
    # Between file systems copy_file_range refuses (EXDEV); the bytes are
    # then copied through user space, and the mapping merges them the same.
    base, adapter, expected = case
    sync = _set(monkeypatch, way)
    monkeypatch.setattr(_write, "_MAPPED_PIECE", 3000)  # pieces end inside tensors

    def refusing(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(_write.os, "copy_file_range", refusing, raising=False)
    monkeypatch.setattr(_write, "_CHUNK", 1000)
    result = _merge(base, adapter, tmp_path / "out", sync)
    _check(result, base, expected)


@pytest.mark.parametrize("way", ["mapped", "mapped, not synced"])
@pytest.mark.parametrize("where", ["kernel", "copy"])
def test_a_failure_on_the_mapped_way_leaves_nothing(tmp_path, case, monkeypatch, way, where):
    base, adapter, _ = case
    sync = _set(monkeypatch, way)
    if where == "kernel":
        def failing(W, A, B, scaling):
            raise RuntimeError("boom")

        monkeypatch.setitem(_write._KERNELS, "BF16", (np.uint16, failing, failing, np.float32))
    else:
        real = _write._Copier.copy

        def copy(self, offset, count):
            if "00002" in self.path.name:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(self, offset, count)

        monkeypatch.setattr(_write._Copier, "copy", copy)
    with pytest.raises((RuntimeError, OSError), match="boom|No space"):
        _merge(base, adapter, tmp_path / "out", sync)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT here")
@pytest.mark.parametrize("at", [0, 2])
def test_a_failed_direct_write_stops_the_merge(tmp_path, case, monkeypatch, at):
    # The writer thread's error reaches the caller (the first chunk, or one
    # past a tensor); no thread is left waiting.
    base, adapter, _ = case
    sync = _set(monkeypatch, "direct")
    monkeypatch.setattr(_write, "_DIRECT_CHUNK", 4096)
    real_pwrite, calls = os.pwrite, []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) > at:
            raise OSError(errno.EIO, "Input/output error")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(_write.os, "pwrite", pwrite)
    with pytest.raises(OSError, match="Input/output error"):
        _merge(base, adapter, tmp_path / "out", sync)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    import threading

    assert not [t for t in threading.enumerate() if t.name.startswith("write ")]


@pytest.mark.parametrize("way", ["mapped", "mapped, not synced", "buffered"])
def test_peft_fixtures_through_the_page_cache(tmp_path, monkeypatch, way):
    # The PEFT-made checkpoints (rank/alpha patterns, rsLoRA, fan_in_fan_out,
    # bf16 and f16; a weighted "cat" on bf16, merged as PEFT does through
    # rounded factors) give the default way's bytes, which the PEFT tests check.
    from .helpers import FIXTURES

    weighted = FIXTURES.parent / "peft_weighted"
    cases = [(FIXTURES / f"{model}_{tag}", FIXTURES / f"{model}_adapter", {})
             for model, tag in [("llama", "bf16"), ("llama", "f16"), ("gpt2", "f32")]]
    cases.append((FIXTURES / "llama_bf16",
                  [FIXTURES / "llama_adapter", weighted / "adapter_c"],
                  {"weights": [0.7, -1.5], "combination": "cat"}))
    monkeypatch.setattr(_write, "MAP_WRITES", False)  # O_DIRECT, or buffers: never mapped
    references = [_merge(base, adapter, tmp_path / f"ref{k}", **kw)
                  for k, (base, adapter, kw) in enumerate(cases)]
    sync = _set(monkeypatch, way)
    for k, (base, adapter, kw) in enumerate(cases):
        result = _merge(base, adapter, tmp_path / f"out{k}", sync, **kw)
        assert result.shards == references[k].shards
        for shard in result.shards:
            assert (result.out / shard).read_bytes() == \
                (references[k].out / shard).read_bytes(), (k, shard)


@pytest.mark.parametrize("sync", [True, False])
def test_merge_sync_argument(tmp_path, case, monkeypatch, sync):
    # merge(sync=...) decides per call.
    base, adapter, expected = case
    files = []
    real_fsync = os.fsync

    def fsync(fd):
        files.append(not os.path.isdir(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(_write.os, "fsync", fsync)
    result = checkpoint.merge(base, adapter, tmp_path / "out", sync=sync)
    _check(result, base, expected)
    if os.path.isdir("/proc/self/fd"):
        assert sum(files) == (len(result.shards) if sync else 0)


def test_merge_sync_must_be_a_bool(tmp_path, case):
    from numba_lora import LoraTypeError

    base, adapter, _ = case
    with pytest.raises(LoraTypeError, match="sync"):
        checkpoint.merge(base, adapter, tmp_path / "out", sync="no")
    assert not (tmp_path / "out").exists()
