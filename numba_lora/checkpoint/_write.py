"""Writing a merged checkpoint: one shard at a time, staged, renamed into place.

A shard is written in one pass over its base file: the header and every
byte of a tensor that does not change are copied as they are; a tensor that
changes is merged by a kernel, in its stored dtype (bfloat16 and float16 as
bits, through float32 tiles), at the same offset.  So the output has the
base's header, byte layout and dtypes, and the memory a shard needs is its
largest adapted tensor, in its stored dtype.

Three ways to the disk, same bytes (tested):

- synced (``sync=True``, the default) where the file system takes
  ``O_DIRECT``: one aligned chunk (:class:`_DirectSink`) assembled from the
  base's unchanged bytes and the merged tensors (read into a buffer, merged
  there), written straight to the disk; no page cache, so the least CPU,
  and the ``fsync`` before the rename has nothing left to write;
- through the page cache (``sync=False``, or ``O_DIRECT`` refused): the
  operating system copies the whole shard (``os.copy_file_range``), and
  each adapted tensor is merged in place in a pre-faulted shared mapping of
  its pages in the output (:data:`MAP_WRITES`), or, where the mapping cannot
  be pre-faulted, read into a buffer, merged and written over its copy;
- the older buffered way (``MAP_WRITES`` off): unchanged bytes copied by the
  operating system, merged buffers written in between.

All output goes to a staging directory beside ``out``, each shard to a
temporary name renamed when complete; the staging directory becomes
``out`` by one rename at the end.  A failed or interrupted merge leaves no
``out`` and no half-written shard.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import queue
import shutil
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np

from .. import kernels
from ..errors import LoraConfigError, LoraFormatError
from ..io.safetensors import SafetensorsFile, as_path
from ..io._fs import quietly as _quietly
from ._plan import MergePlan

__all__ = ["write_shard", "run_shards", "Output"]

# Stored dtype -> (NumPy dtype of the buffer, kernel on Numba's threads,
# kernel on the calling thread, dtype of the factors).  Same bits either way.
_KERNELS = {
    "F32": (np.float32, kernels.merge, kernels.merge_serial, np.float32),
    "F64": (np.float64, kernels.merge, kernels.merge_serial, np.float64),
    "BF16": (np.uint16, kernels.merge_bf16, kernels.merge_bf16_serial, np.float32),
    "F16": (np.uint16, kernels.merge_f16, kernels.merge_f16_serial, np.float32),
}

_CHUNK = 8 << 20  # bytes per read/write where the kernel cannot copy
_BIG_ENDIAN = sys.byteorder == "big"


#: Write shards with O_DIRECT where the file system takes it: the bytes go from
#: one aligned chunk straight to the disk, not through the page cache, which
#: saves the kernel's copy of every byte and the page-cache bookkeeping (the
#: largest CPU cost of a merge after the arithmetic), and the fsync before
#: the rename finds nothing left to write.  Elsewhere (tmpfs, other systems)
#: the buffered path: ``copy_file_range`` for unchanged bytes, ``write``.
DIRECT_IO = True
_ALIGN = 4096  # O_DIRECT offsets, lengths and addresses: a multiple of every logical block size
_DIRECT_CHUNK = 8 << 20

#: Where the bytes go through the page cache: merge each adapted tensor in
#: place in a shared mapping of the output, after the operating system has
#: copied the whole shard (``copy_file_range``), rather than reading it into
#: a buffer, merging and writing the buffer.  Used only where the kernel can
#: pre-fault the mapping (``MADV_POPULATE_WRITE``, Linux 5.14 and later),
#: which reports a page it cannot make writable as an error, not SIGBUS.
MAP_WRITES = True
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE",
                               23 if sys.platform.startswith("linux") else None)
_MAPPED_PIECE = 64 << 20  # bytes per copy_file_range call of a shard merged in place


def _open_output(path, sync):
    """(unbuffered binary file, True if O_DIRECT) for a new shard file at ``path``."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    direct = DIRECT_IO and sync and hasattr(os, "O_DIRECT")
    fd = None
    if direct:
        try:
            fd = os.open(path, flags | os.O_DIRECT, 0o666)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this file system has no O_DIRECT
                raise
            direct = False
    if fd is None:
        fd = os.open(path, flags, 0o666)
    return open(fd, "r+b", buffering=0), direct


class _Copier:
    """Copies byte ranges of ``src`` to ``dst``'s position: in the kernel where it can."""

    def __init__(self, src, dst, path, sync):
        self.src, self.dst, self.path, self.synced = src, dst, path, sync
        self.in_kernel = hasattr(os, "copy_file_range")
        self._buffer = None

    def copy(self, offset, count):
        while count > 0:
            n = 0
            if self.in_kernel:
                try:
                    n = os.copy_file_range(self.src.fileno(), self.dst.fileno(), count, offset)
                except OSError:
                    # Not between these file systems (EXDEV, EINVAL, ENOSYS,
                    # EPERM under some sandboxes): copy through user space.
                    self.in_kernel = False
                    continue
            else:
                if self._buffer is None:
                    self._buffer = memoryview(bytearray(_CHUNK))
                view = self._buffer[:min(count, _CHUNK)]
                self.src.seek(offset)
                n = self.src.readinto(view) or 0
                _write_all(self.dst, view[:n])
            if n == 0:
                raise LoraFormatError(f"{self.path} ends early: the file changed or is truncated")
            offset += n
            count -= n


    def write(self, view):
        _write_all(self.dst, view)

    def sync(self):
        if self.synced:
            os.fsync(self.dst.fileno())


class _DirectSink:
    """Writes a shard's bytes, handed over in file order, through one aligned chunk (O_DIRECT).

    Unchanged byte ranges are read from ``src`` into the chunk, merged
    tensors copied into it; each full chunk is written at its offset.  The
    last one is padded to the alignment and the file cut back to ``size``.
    If the file system refuses an O_DIRECT write (EINVAL), the file is
    switched to buffered writes and the same chunks are written that way.
    """

    def __init__(self, src, dst, path, size):
        self.src, self.dst, self.path, self.size = src, dst, path, size
        self._chunk = mmap.mmap(-1, _DIRECT_CHUNK)  # page-aligned, as O_DIRECT needs
        self._view = memoryview(self._chunk)
        self._fill = 0  # bytes in the chunk
        self._at = 0  # file offset of the chunk's first byte
        self.direct = True

    def copy(self, offset, count):
        if self.src is None:
            raise LoraFormatError(f"{self.path} could not be opened")
        while count > 0:
            n = min(count, len(self._view) - self._fill)
            got = os.preadv(self.src.fileno(), [self._view[self._fill:self._fill + n]], offset)
            if not got:
                raise LoraFormatError(f"{self.path} ends early: the file changed or is truncated")
            self._advance(got)
            offset += got
            count -= got

    def write(self, view):
        view = memoryview(view).cast("B")
        while len(view):
            n = min(len(view), len(self._view) - self._fill)
            self._view[self._fill:self._fill + n] = view[:n]
            self._advance(n)
            view = view[n:]

    def _advance(self, n):
        self._fill += n
        if self._fill == len(self._view):
            self._flush()

    def _flush(self):
        n = self._fill
        padded = n + (-n % _ALIGN)
        self._view[n:padded] = bytes(padded - n)  # cut off again by sync()
        fd = self.dst.fileno()
        done = 0
        while done < padded:
            try:
                done += os.pwrite(fd, self._view[done:padded], self._at + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                import fcntl  # POSIX, as O_DIRECT is

                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self.direct = False
        self._at += n
        self._fill = 0

    def sync(self):
        if self._fill:
            self._flush()
        if self._at != self.size:
            raise LoraFormatError(f"{self.path}: wrote {self._at} bytes of {self.size}")
        os.ftruncate(self.dst.fileno(), self.size)
        os.fsync(self.dst.fileno())
        self._view.release()
        self._chunk.close()


def _write_all(dst, view):
    while len(view):
        n = dst.write(view)
        view = view[n:]


def _read_exactly(src, offset, view, path, key):
    src.seek(offset)
    got = 0
    while got < len(view):
        n = src.readinto(view[got:])
        if not n:
            raise LoraFormatError(
                f"{path}: tensor {key!r} ends early: the file changed or is truncated")
        got += n


def _read_factors(files, source, compute):
    """(A, B) of one adapter's module, in ``compute`` dtype, shapes checked against the plan."""
    adapter = files[source.adapter_file]
    factors = adapter.read_many([source.a_key, source.b_key])
    A = np.ascontiguousarray(factors[source.a_key], dtype=compute)
    B = np.ascontiguousarray(factors[source.b_key], dtype=compute)
    if A.shape[0] != source.rank or B.shape != (B.shape[0], source.rank):
        raise LoraFormatError(
            f"{adapter.path}: tensors {source.a_key!r} {A.shape} and {source.b_key!r} "
            f"{B.shape} no longer fit: the adapter changed since the merge was checked")
    return A, B


def _combine(files, merge, compute):
    """The combined adapter's (A, B), as PEFT's ``add_weighted_adapter`` makes them.

    "cat": A stacks each adapter's ``A * weight * scaling`` (two roundings,
    in that order), B stacks the B's, both padded with zeros to the combined
    rank.  "linear": A = sum of ``A * float32(sign * sqrt(|weight * scaling|))``,
    B = sum of ``B * float32(sqrt(|weight * scaling|))``, added in adapter
    order.  Weights and scalings are Python floats, as in PEFT; each product
    is rounded to ``compute``.
    """
    pairs = [_read_factors(files, source, compute) for source in merge.sources]
    cols, rows = pairs[0][0].shape[1], pairs[0][1].shape[0]
    if merge.combination == "cat":
        A = np.zeros((merge.rank, cols), compute)
        B = np.zeros((rows, merge.rank), compute)
        at = 0
        for source, (a, b) in zip(merge.sources, pairs):
            A[at:at + source.rank] = (a * compute(source.weight)) * compute(source.scaling)
            B[:, at:at + source.rank] = b
            at += source.rank
        return A, B
    A = B = None
    for source, (a, b) in zip(merge.sources, pairs):
        value = source.weight * source.scaling
        root = math.sqrt(abs(value))
        # PEFT puts the weights in a float32 tensor: each is rounded to float32.
        wa = compute(np.float32(root if value >= 0 else -root))
        wb = compute(np.float32(root))
        a, b = a * wa, b * wb
        A = a if A is None else A + a
        B = b if B is None else B + b
    return A, B


_HALF = ("BF16", "F16")


def _to_half(x, code):
    """float32 ``x`` rounded to bfloat16 / float16 (to nearest, ties to even), as bits."""
    x = np.ascontiguousarray(x, np.float32)
    if code == "F16":
        return x.astype(np.float16).view(np.uint16)
    bits = np.empty(x.size, np.uint16)
    kernels.round_bf16(x.reshape(-1), bits)
    return bits.reshape(x.shape)


def _from_half(bits, code):
    """bfloat16 / float16 bits widened to float32, exactly."""
    if code == "F16":
        return bits.view(np.float16).astype(np.float32)
    out = np.empty(bits.size, np.float32)
    kernels.widen_bf16(np.ascontiguousarray(bits).reshape(-1), out)
    return out.reshape(bits.shape)


def _merge_half_as_peft(W, A, B, scaling, code, merge_f32):
    """PEFT's merge of a "cat" combination into bfloat16 / float16 bits ``W``.

    PEFT holds a "cat" combination's factors in the model's dtype (its
    ``add_weighted_adapter`` copies the float32 stack into them), and its
    merge on a CPU computes the delta in float32 from them, rounds the delta
    to that dtype, and adds it: ``W = round(W + round(scaling * B @ A))``,
    with A and B rounded first.  The float32 delta is
    :func:`numba_lora.kernels.merge`'s, added to -0.0 (which leaves every
    value, signed zeros included, as it is).  Memory: two float32 arrays of
    W's shape.
    """
    A = _from_half(_to_half(A, code), code)
    B = _from_half(_to_half(B, code), code)
    delta = np.full(W.shape, -0.0, np.float32)
    merge_f32(delta, A, B, scaling)
    total = _from_half(W, code)
    total += _from_half(_to_half(delta, code), code)
    del delta
    W[...] = _to_half(total, code)


def _factors(files, merge, info, compute):
    """(A, B) as the kernel takes them for W's stored layout, in ``compute`` dtype."""
    if merge.combination == "none":
        A, B = _read_factors(files, merge.sources[0], compute)
    else:
        A, B = _combine(files, merge, compute)
    rows, cols = (info.shape[1], info.shape[0]) if merge.fan_in_fan_out else info.shape
    if A.shape != (merge.rank, cols) or B.shape != (rows, merge.rank):
        raise LoraFormatError(
            f"{merge.sources[0].adapter_file}: the factors of {merge.module!r} {A.shape} and "
            f"{B.shape} no longer fit tensor {merge.tensor!r}: the adapter changed since the "
            "merge was checked")
    if merge.fan_in_fan_out:
        # W is stored (in, out) = (B @ A).T, and (B @ A).T = A.T @ B.T with
        # the same products summed in the same order over the rank.
        A, B = np.ascontiguousarray(B.T), np.ascontiguousarray(A.T)
    return A, B


class _ShardJob:
    """One shard: the calling thread reads and merges, a writer thread writes.

    The writer takes, in file order, byte ranges to copy and merged buffers
    to write, then syncs the file; two buffers of the shard's largest
    adapted tensor (in its stored dtype) go round between the two threads,
    so reading and merging a tensor overlaps writing the previous one, and
    memory stays at two tensors.  Through the page cache with
    :data:`MAP_WRITES`, no buffers: the writer copies the whole shard and
    the calling thread merges each adapted tensor in the output's pages
    once they are copied (:meth:`_run_mapped`).  :meth:`finish` waits for
    the writer and renames the file into place; until then the shard has a
    temporary name.
    """

    def __init__(self, plan, shard, directory, progress=None, sync=True):
        directory = as_path(directory, "directory")
        self.sync = bool(sync)
        layout = next((s for s in plan.checkpoint.shards if s.name == shard), None)
        if layout is None:
            raise LoraConfigError(f"{shard!r} is not a shard of {plan.checkpoint.directory}")
        self.layout = layout
        self.path = plan.checkpoint.directory / shard
        self.final = directory / shard
        self.merges = plan.merges_in(shard)
        self.adapters = ({path: SafetensorsFile(path) for path in plan.adapter_files}
                         if self.merges else None)
        self.report = progress or (lambda n: None)
        self.tmp = directory / f".{shard}.{uuid.uuid4().hex}.tmp"
        self._src = self._dst = self._thread = None
        self._direct = False
        self._mapped = False  # merges left for complete()
        self._queue = queue.Queue()
        self._free = queue.Queue()
        self._error = None

    # ------------------------------------------------------- writer thread
    def _write(self):
        # Its own handle on the base file: the calling thread seeks the other.
        src = None
        try:
            src = open(self.path, "rb", buffering=0)
        except BaseException as exc:
            # Keep taking items (and handing buffers back), or the calling
            # thread would wait for a buffer forever.
            self._error = exc
        sink = None
        try:
            try:
                sink = (_DirectSink(src, self._dst, self.path, self.layout.size) if self._direct
                        else _Copier(src, self._dst, self.path, self.sync))
            except BaseException as exc:  # as above: the loop below only hands things back
                self._error = self._error or exc
            self._write_from(sink)
        finally:
            if src is not None:
                src.close()

    def _write_from(self, copier):
        while True:
            item = self._queue.get()
            if item is None:
                return
            kind, first, second = item
            if self._error is None:
                try:
                    if kind == "copy":
                        copier.copy(first, second)
                    elif kind == "buffer":
                        copier.write(second)
                    elif kind == "sync":  # every buffer is back; free them before the wait
                        while not self._free.empty():
                            self._free.get_nowait()
                        copier.sync()
                except BaseException as exc:  # handed to the calling thread
                    self._error = exc
            # Whatever happened, hand back what the calling thread waits for.
            if kind == "buffer":
                self._free.put(first)
            elif kind == "signal":  # everything queued before it is copied
                first.set()

    def _check(self):
        if self._error is not None:
            raise self._error

    # ------------------------------------------------------ calling thread
    def run(self):
        """Read, merge and queue every piece of the shard; the writer may still be busy.

        Where adapted tensors are merged in a mapping of the output
        (:meth:`_run_mapped`), this only starts the writer's copy of the
        shard: :meth:`complete` merges them, so that the calling thread can
        merge the previous shard while this one is copied.

        The kernels get one thread fewer than Numba's count (at least one):
        the writer thread needs a core of its own, or the two take turns.
        """
        self._threaded(self._run)

    def complete(self):
        """Merge the adapted tensors left by :meth:`run` (if any) and queue the sync."""
        if self._mapped:
            self._mapped = False
            self._threaded(self._merge_mapped)

    def _threaded(self, action):
        previous = numba.get_num_threads()
        self._kernel_threads = max(1, previous - 1)
        numba.set_num_threads(self._kernel_threads)  # this thread's count only
        try:
            action()
        finally:
            numba.set_num_threads(previous)

    def _run(self):
        layout = self.layout
        self._src = open(self.path, "rb", buffering=0)
        self._dst, self._direct = _open_output(self.tmp, self.sync)
        if os.fstat(self._src.fileno()).st_size != layout.size:
            raise LoraFormatError(f"{self.path} changed size since the merge was checked")
        mapped = (MAP_WRITES and not self._direct and bool(self.merges)
                  and _MADV_POPULATE_WRITE is not None and hasattr(mmap.mmap, "madvise"))
        if self.merges and not mapped:
            largest = max(_nbytes(layout.tensor(name)) for name in self.merges)
            for _ in range(2):
                self._free.put(np.empty(largest, np.uint8))
        self._thread = threading.Thread(target=self._write, name=f"write {layout.name}",
                                        daemon=True)
        self._thread.start()
        if mapped:
            self._run_mapped()
            self._mapped = True
            return
        self._queue.put(("copy", 0, layout.data_start))
        self.report(layout.data_start)
        position = 0  # bytes of data queued so far, from the data start
        for info in layout.tensors:
            merge = self.merges.get(info.name)
            if merge is None:
                continue
            self._queue.put(("copy", layout.data_start + position, info.start - position))
            self.report(info.start - position)
            buffer = self._free.get()
            self._check()
            self._queue.put(("buffer", buffer, self._merge(buffer, info, merge)))
            self.report(info.stop - info.start)
            position = info.stop
        rest = layout.size - layout.data_start - position
        self._queue.put(("copy", layout.data_start + position, rest))
        self.report(rest)
        self._queue.put(("sync", None, None))
        self._queue.put(None)

    def _run_mapped(self):
        """Queue the copy of the whole shard; :meth:`_merge_mapped` merges in the output.

        The writer copies the shard (in the kernel where it can), in pieces
        so that an abort is heard between them.  The merges wait for the
        whole copy: mapping pages of the file while the writer is still
        writing it cost 40% more system time here (three times the page
        faults), more than the overlap won; the calling thread merges the
        previous shard meanwhile (:func:`run_shards`).
        """
        size = self.layout.size
        for offset in range(0, size, _MAPPED_PIECE):
            self._queue.put(("copy", offset, min(_MAPPED_PIECE, size - offset)))
        self._copied = threading.Event()
        self._queue.put(("signal", self._copied, None))

    def _merge_mapped(self):
        """Once the shard is copied, merge each adapted tensor in place in its pages.

        Each tensor's pages are mapped, pre-faulted, merged in place and
        unmapped, so memory stays at one tensor's pages.  The writer syncs
        after the last merge.
        """
        layout = self.layout
        self._copied.wait()
        self._check()
        reported = 0
        for info in layout.tensors:
            merge = self.merges.get(info.name)
            if merge is None:
                continue
            self.report(layout.data_start + info.start - reported)
            self._merge_in_place(info, merge)
            self.report(info.stop - info.start)
            reported = layout.data_start + info.stop
        self.report(layout.size - reported)
        self._queue.put(("sync", None, None))
        self._queue.put(None)

    def _merge_in_place(self, info, merge):
        """Merge one tensor in a shared mapping of the output file, or by pwrite if refused."""
        dtype = _KERNELS[info.dtype][0]
        start = self.layout.data_start + info.start
        nbytes = _nbytes(info)
        if nbytes == 0:
            self._compute(np.empty(info.shape, dtype), info, merge)
            return
        lo = start - start % mmap.ALLOCATIONGRANULARITY
        region = mmap.mmap(self._dst.fileno(), start + nbytes - lo, offset=lo)
        W = None
        try:
            try:
                region.madvise(_MADV_POPULATE_WRITE)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise  # a page that cannot be made writable: disk full, I/O error
                self._merge_by_write(info, merge)
                return
            W = np.frombuffer(region, dtype, count=nbytes // np.dtype(dtype).itemsize,
                              offset=start - lo).reshape(info.shape)
            self._compute(W, info, merge)
        finally:
            W = None
            try:
                region.close()
            except BufferError:
                pass  # a failed kernel's traceback still holds W: unmapped when it goes

    def _merge_by_write(self, info, merge):
        """The tensor read, merged in a buffer and written over its copy (no mapping)."""
        buffer = np.empty(_nbytes(info), np.uint8)
        view = self._merge(buffer, info, merge)
        offset = self.layout.data_start + info.start
        while len(view):
            n = os.pwrite(self._dst.fileno(), view, offset)
            view, offset = view[n:], offset + n

    def _merge(self, buffer, info, merge):
        dtype = _KERNELS[info.dtype][0]
        view = memoryview(buffer)[:_nbytes(info)]
        W = np.frombuffer(view, dtype).reshape(info.shape)
        _read_exactly(self._src, self.layout.data_start + info.start, view, self.path, info.name)
        self._compute(W, info, merge)
        return view

    def _compute(self, W, info, merge):
        """Merge ``merge`` into ``W`` (the tensor's stored bits, in file byte order) in place."""
        _, threaded, serial, compute = _KERNELS[info.dtype]
        kernel = threaded if self._kernel_threads > 1 else serial
        if _BIG_ENDIAN:
            W.byteswap(inplace=True)
        A, B = _factors(self.adapters, merge, info, compute)
        if merge.combination == "cat" and info.dtype in _HALF:
            _merge_half_as_peft(W, A, B, merge.scaling, info.dtype,
                                kernels.merge if self._kernel_threads > 1 else kernels.merge_serial)
        else:
            kernel(W, A, B, merge.scaling)
        if _BIG_ENDIAN:
            W.byteswap(inplace=True)

    def finish(self):
        """Wait for the writer, then rename the shard into place; return its bytes."""
        try:
            self._join()
            self._check()
            os.replace(self.tmp, self.final)
        except BaseException:
            _quietly(self.tmp.unlink, missing_ok=True)
            raise
        return self.layout.size

    def abort(self):
        """Stop the writer and remove the temporary file (quietly: an error is being raised)."""
        if self._thread is not None and self._thread.is_alive():
            self._error = self._error or LoraFormatError("aborted")
            self._queue.put(None)
        self._join()
        _quietly(self.tmp.unlink, missing_ok=True)

    def _join(self):
        if self._thread is not None:
            self._thread.join()
        for fh in (self._src, self._dst):
            if fh is not None:
                fh.close()


def _nbytes(info):
    return (info.stop - info.start)


def run_shards(plan, shards, directory, progress=None, on_shard=None, sync=True):
    """Write ``shards`` one after another, each one's sync overlapping the next one's work.

    Returns the bytes written.  On any failure every shard not yet renamed
    into place is removed.
    """
    written = 0
    alive = []  # jobs whose writer may still run: at most this shard's and the last one's
    try:
        for shard in shards:
            if on_shard is not None:
                on_shard(shard)
            alive.append(_ShardJob(plan, shard, directory, progress, sync))
            alive[-1].run()
            if len(alive) == 2:
                alive[0].complete()  # merges in place while this shard is copied
                written += alive[0].finish()
                alive.pop(0)
        while alive:
            alive[0].complete()
            written += alive[0].finish()
            alive.pop(0)
    except BaseException:
        for job in alive:
            job.abort()
        raise
    return written


def write_shard(plan: MergePlan, shard: str, directory: str | os.PathLike[str],
                progress: Callable[[int], object] | None = None,
                sync: bool = True) -> int:
    """Write the merged ``shard`` of ``plan`` into ``directory``; return its bytes.

    The shard is written to a temporary name in ``directory`` and renamed
    to its own name only once complete and synced, so a failure leaves no
    file of that name (nor the temporary).  Safe to call from several
    processes for different shards of one plan (a Dask task per shard).

    Parameters
    ----------
    plan : MergePlan
    shard : str
        One of ``plan.shards``.
    directory : str or os.PathLike
        Where the shard goes (the staging directory of a merge).
    progress : callable, optional
        Called with the number of bytes of each piece as it is queued.
    sync : bool, optional
        ``fsync`` the shard before its rename (default), so it is durable
        once renamed; ``False`` renames it once its bytes are in the page
        cache, as ``shutil.copyfile`` leaves a copy (a failure still leaves
        nothing half-written; a power loss soon after can), and never uses
        ``O_DIRECT``, which writes to the disk as it goes.

    Returns
    -------
    int
        Bytes written (the shard's size).
    """
    return run_shards(plan, [shard], directory, progress, sync=sync)


class Output:
    """The output directory of a merge: checked, staged beside it, committed by one rename.

    Parameters
    ----------
    plan : MergePlan
    out : str or os.PathLike
        Must not exist, or be an empty directory; must not be the base's or
        the adapter's directory.  Missing parent directories are created
        (and removed again if the merge fails).
    """

    def __init__(self, plan: MergePlan, out: str | os.PathLike[str]) -> None:
        out = as_path(out, "out")
        if out.is_symlink():
            raise LoraConfigError(f"out {out} is a symbolic link; give a directory path")
        base = plan.checkpoint.directory
        others = [(base, "base checkpoint")] + [(Path(f).parent, "adapter")
                                               for f in plan.adapter_files]
        for other, what in others:
            if _same(out, other):
                raise LoraConfigError(
                    f"out {out} is the {what}'s own directory; write the merged checkpoint "
                    "to a new directory")
        if out.exists() or out.is_symlink():
            if not out.is_dir():
                raise LoraConfigError(f"out {out} exists and is not a directory")
            if any(out.iterdir()):
                raise LoraConfigError(
                    f"out {out} is not empty; give a new or empty directory, so that no "
                    "file of another checkpoint is left beside the merged one")
        self.out = out
        self.plan = plan
        self._created = []
        parent = out.parent
        while not parent.exists():
            self._created.append(parent)
            parent = parent.parent
        if not parent.is_dir():
            raise LoraConfigError(
                f"out {out}: {parent} exists and is not a directory; give a directory path")
        out.parent.mkdir(parents=True, exist_ok=True)
        self.staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex}"
        try:
            self.staging.mkdir()
        except BaseException:
            self._remove_created()
            raise

    def commit(self) -> None:
        """Copy the index and the other files, then rename the staging directory to ``out``."""
        checkpoint = self.plan.checkpoint
        for shard in self.plan.shards:
            if not (self.staging / shard).is_file():
                raise LoraFormatError(f"shard {shard} was not written to {self.staging}")
        names = ((checkpoint.index,) if checkpoint.index else ()) + checkpoint.other_files
        for name in names:
            tmp = self.staging / f".{name}.{uuid.uuid4().hex}.tmp"
            shutil.copyfile(checkpoint.directory / name, tmp)
            os.replace(tmp, self.staging / name)
        _fsync_directory(self.staging)
        if self.out.is_dir() and not self.out.is_symlink():
            self.out.rmdir()  # empty, checked above; fails if something appeared since
        os.rename(self.staging, self.out)
        _fsync_directory(self.out.parent)

    def abort(self) -> None:
        """Remove the staging directory and the parents this merge created."""
        shutil.rmtree(self.staging, ignore_errors=True)
        self._remove_created()

    def _remove_created(self):
        for directory in self._created:
            if not _quietly(directory.rmdir):
                break


def _same(a, b):
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _fsync_directory(path):
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

