"""Merge a PEFT LoRA adapter into a Hugging Face safetensors checkpoint, shard by shard.

:func:`merge` is the whole job; :func:`plan_merge`, :func:`write_shard` and
:class:`Output` are its three steps, for running the shards elsewhere
(:mod:`numba_lora.distributed` runs one Dask task per shard with them)::

    from numba_lora import checkpoint

    result = checkpoint.merge("llama-7b/", "my-adapter/", "llama-7b-merged/")
    print(result.merged, result.bytes, result.seconds)

The base is read one tensor at a time; the output has the base's shard
files, tensor names, dtypes, byte layout and index, and its other files
(config.json, tokenizer files, ...).  The arithmetic is
:func:`numba_lora.kernels.merge` for float32 and float64 weights, and
:func:`numba_lora.kernels.merge_bf16` / ``merge_f16`` for bfloat16 and
float16 ones (float32 delta, one rounding): PEFT's default
``merge_and_unload()``, bit for bit.  See ``docs/checkpoint.rst``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .._validate import check_flag
from ..errors import LoraTypeError
from ._layout import Checkpoint, Shard, TensorInfo, read_checkpoint
from ._plan import COMBINATIONS, DTYPES, FactorSource, MergePlan, TensorMerge, plan_merge
from ._write import Output, run_shards, write_shard

__all__ = [
    "merge",
    "MergeResult",
    "plan_merge",
    "write_shard",
    "Output",
    "MergePlan",
    "TensorMerge",
    "FactorSource",
    "Checkpoint",
    "Shard",
    "TensorInfo",
    "read_checkpoint",
    "DTYPES",
    "COMBINATIONS",
]


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge` wrote.

    Attributes
    ----------
    out : pathlib.Path
        The merged checkpoint's directory.
    shards : tuple of str
        Shard files written, in the index's order.
    merged : tuple of str
        Names of the tensors the adapter changed.
    copied : tuple of str
        Other files copied as they are (the index first, if any).
    skipped : tuple of (str, str)
        Entries of the base directory not copied, with the reason
        (subdirectories; weights in other formats, which would be stale).
    bytes : int
        Bytes of the shards written.
    seconds : float
        Wall time of the whole merge.
    """

    out: Path
    shards: tuple
    merged: tuple
    copied: tuple
    skipped: tuple
    bytes: int
    seconds: float

    @property
    def bytes_per_second(self) -> float:
        """float: Shard bytes written per second."""
        return self.bytes / self.seconds if self.seconds > 0 else float("inf")


class _Bar:
    """A tqdm bar over bytes, when tqdm is installed and wanted; otherwise nothing."""

    @staticmethod
    def check(progress):
        if progress is not None and not isinstance(progress, bool):
            raise LoraTypeError(
                f"progress must be None (on a terminal), True or False, got {progress!r}")

    def __init__(self, progress, total):
        if progress is None:
            progress = sys.stderr.isatty()
        self._bar = None
        if progress:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # optional: no bar without it
                return
            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                             desc="merge", leave=False)

    def shard(self, name):
        if self._bar is not None:
            self._bar.set_description(name)

    def update(self, n):
        if self._bar is not None and n:
            self._bar.update(n)

    def close(self):
        if self._bar is not None:
            self._bar.close()


def merge(base: str | os.PathLike[str],
          adapter: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
          out: str | os.PathLike[str], *, dtype: str = "keep",
          weights: Sequence[float] | None = None, combination: str | None = None,
          progress: bool | None = None, sync: bool = True) -> MergeResult:
    """Write ``base`` with ``adapter`` merged into it to the new directory ``out``.

    Parameters
    ----------
    base : str or os.PathLike
        A Hugging Face checkpoint directory: ``model.safetensors``, or shards
        and their ``*.safetensors.index.json``, plus config and tokenizer
        files.  Read one tensor at a time; never modified.
    adapter : str or os.PathLike, or list of them
        A PEFT LoRA adapter directory (``adapter_config.json`` and
        ``adapter_model.safetensors``).  Everything
        :meth:`numba_lora.LoraAdapter.from_peft` honours is honoured (rank
        and alpha patterns, rsLoRA, ``fan_in_fan_out``) and everything it
        refuses is refused.  A list of adapter directories is a weighted
        merge (``weights`` needed): the adapters are combined as PEFT's
        ``add_weighted_adapter(adapters, weights, name, combination_type)``
        combines them, and the combination is merged.
    out : str or os.PathLike
        A new or empty directory, not the base's or the adapter's.
    dtype : {"keep"}
        Every tensor keeps its stored dtype (float16, bfloat16, float32,
        float64 for the adapted ones).
    weights : list of float, optional
        With a list of adapters: one weight per adapter (any sign).
    combination : {"cat", "linear"}, optional
        With a list of adapters (default ``"cat"``), PEFT's
        ``combination_type``:

        - ``"cat"``: exact; the combined adapter stacks the adapters'
          factors, each ``A`` times its weight and its own scaling, so its
          delta is the weighted sum of the adapters' deltas (rank: the sum of
          the ranks);
        - ``"linear"``: the adapters' ``A`` summed with weights
          ``sign * sqrt(|weight * scaling|)``, their ``B`` with
          ``sqrt(|weight * scaling|)``; needs one rank, and is only an
          approximation of the weighted sum of deltas (PEFT's words: "very
          rough").

        As in PEFT, one adapter in a list is always combined linearly, and
        the combined adapter has ``lora_alpha = r``, so scaling 1, unless the
        first adapter uses rsLoRA: then its scaling is ``sqrt(r)`` (PEFT
        copies ``use_rslora`` from the first adapter's config).  The other
        types (SVD, TIES, DARE, magnitude pruning) are not offered.
    progress : bool or None
        A tqdm progress bar over bytes on stderr; ``None`` (default): only
        when stderr is a terminal and tqdm is installed.
    sync : bool
        ``True`` (default): every shard is on disk before it is renamed
        into place (written with ``O_DIRECT`` where the file system allows,
        then ``fsync``), so the merged checkpoint is durable when this
        returns.  ``False``: shards are renamed once their bytes are in the
        page cache, as a plain copy (``shutil.copyfile``) or
        ``save_pretrained`` leaves its files, and the operating system
        writes them out later: faster where the disk is the bound (see
        :doc:`/checkpoint`, "Throughput").  A failure or an interruption
        still leaves nothing half-written either way; only a power loss
        soon after an unsynced merge can.

    Returns
    -------
    MergeResult
        What was written: the directory, shards, merged and copied names, bytes and time.

    Raises
    ------
    LoraFormatError
        A malformed checkpoint or adapter (the message names the file and
        the key): a shard missing or disagreeing with the index, a shape
        that does not fit, a base tensor of a dtype that cannot be merged.
    LoraKeyError
        An adapter module with no tensor in the checkpoint.
    LoraUnsupportedError
        An adapter feature numba_lora does not implement (DoRA, ...).
    LoraConfigError
        ``out`` is the base's or adapter's directory, or not empty; a bad
        ``dtype``, ``combination`` or weight count; adapters of different
        ranks for ``"linear"``; weights without a list of adapters.
    LoraTypeError
        A path that is not a str or os.PathLike; a weight that is not a real
        number.
    OSError
        The file system refused (permissions, disk full).

    Every check on the checkpoint and the adapter (every adapter module
    matched to a tensor, every shape) is done before anything is written.
    Whatever fails, ``out`` is left as it was: shards are written into a
    staging directory beside it (``.OUT.partial-*``), renamed to ``out`` at
    the end, and removed on failure.
    """
    start = time.perf_counter()
    _Bar.check(progress)
    sync = check_flag(sync, "sync")
    plan = plan_merge(base, adapter, dtype=dtype, weights=weights, combination=combination)
    output = Output(plan, out)
    bar = _Bar(progress, plan.checkpoint.total_bytes)
    try:
        written = run_shards(plan, plan.shards, output.staging, progress=bar.update,
                             on_shard=bar.shard, sync=sync)
        output.commit()
    except BaseException:
        output.abort()
        raise
    finally:
        bar.close()
    checkpoint = plan.checkpoint
    return MergeResult(
        out=output.out,
        shards=plan.shards,
        merged=tuple(m.tensor for m in plan.merges),
        copied=((checkpoint.index,) if checkpoint.index else ()) + checkpoint.other_files,
        skipped=checkpoint.skipped,
        bytes=written,
        seconds=time.perf_counter() - start,
    )
