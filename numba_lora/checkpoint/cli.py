"""``python -m numba_lora merge BASE_DIR ADAPTER_DIR [ADAPTER_DIR ...] OUT_DIR``: the checkpoint merge.

Several adapters with ``--weights W [W ...]`` (and ``--combination cat|linear``)
are combined as PEFT's ``add_weighted_adapter`` combines them, then merged.

Exit codes: 0 merged; 1 the merge was refused or failed (one line on
stderr, naming the file and the key; nothing written); 2 a usage error: a
bad option, a weight that is not a finite number, a weight count that does
not match the adapters, a BASE_DIR or ADAPTER_DIR that is not a directory, or
an OUT_DIR that is a file or a directory that is not empty.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numba

from ..errors import LoraError
from . import COMBINATIONS, DTYPES, merge

__all__ = ["DESCRIPTION", "add_arguments", "execute"]

DESCRIPTION = (
    "Merge a PEFT LoRA adapter into a Hugging Face safetensors checkpoint, shard by shard, "
    "into a new directory: same shards, tensor names, dtypes, byte layout and index, other "
    "files copied. Float32 weights merge as PEFT's merge_and_unload() does, bit for bit; "
    "bfloat16/float16 ones in float32, rounded once to the stored dtype.")


def _threads(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    high = numba.config.NUMBA_NUM_THREADS
    if not 1 <= n <= high:
        raise argparse.ArgumentTypeError(f"must be between 1 and NUMBA_NUM_THREADS = {high}")
    return n


def _weight(text):
    try:
        value = float(text)
    except ValueError:
        # nargs="+" takes every word up to the next option: a directory given
        # after --weights lands here, so say how to separate them.
        raise argparse.ArgumentTypeError(
            f"expected a number, got {text!r} (give --weights after the directories, "
            "or end its list with --)") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _check_paths(args, p):
    """Refuse, as usage errors, directories that do not exist and an OUT_DIR already used."""
    for label, path in [("BASE_DIR", args.base)] + [("ADAPTER_DIR", a) for a in args.adapter]:
        if not os.path.isdir(path):
            what = "is a file" if os.path.exists(path) else "does not exist"
            p.error(f"argument {label}: {path!r} {what}; expected a directory")
    if os.path.isdir(args.out):
        if os.listdir(args.out):
            p.error(f"argument OUT_DIR: {args.out!r} is not empty; give a new or empty directory")
    elif os.path.lexists(args.out):
        p.error(f"argument OUT_DIR: {args.out!r} is a file; give a new or empty directory")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the merge command's arguments to parser ``p``.

    Parameters
    ----------
    p : argparse.ArgumentParser
        The ``merge`` subparser of ``python -m numba_lora``.

    Returns
    -------
    argparse.ArgumentParser
        ``p`` itself.
    """
    p.add_argument("base", metavar="BASE_DIR",
                   help="the base checkpoint: model.safetensors, or shards and their index")
    p.add_argument("adapter", metavar="ADAPTER_DIR", nargs="+",
                   help="the PEFT adapter: adapter_config.json and adapter_model.safetensors "
                   "(several, with --weights: a weighted merge)")
    p.add_argument("out", metavar="OUT_DIR",
                   help="where the merged checkpoint goes: a new or empty directory")
    p.add_argument("--weights", type=_weight, nargs="+", metavar="W", default=None,
                   help="one weight per adapter: combine the adapters as PEFT's "
                   "add_weighted_adapter does, then merge the combination")
    p.add_argument("--combination", choices=COMBINATIONS, default=None,
                   help="how to combine weighted adapters (default: cat, exact)")
    p.add_argument("--dtype", choices=DTYPES, default="keep",
                   help="dtype of the merged tensors (default: keep each stored dtype)")
    p.add_argument("--threads", type=_threads, default=None,
                   help="Numba and BLAS threads for the merge kernels (default: Numba's)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar on stderr (needs tqdm; default: on a terminal)")
    p.add_argument("--sync", action=argparse.BooleanOptionalAction, default=True,
                   help="each shard on disk before it is renamed into place (default); "
                        "--no-sync leaves it in the page cache, as a plain copy does")
    return p


def execute(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    """Run the merge for parsed ``args``; returns the exit code.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed arguments.
    p : argparse.ArgumentParser
        The parser that parsed them (for ``p.error``).

    Returns
    -------
    int
        0 merged, 1 refused or failed (a usage error exits with 2 instead).
    """
    _check_paths(args, p)
    if args.weights is not None and len(args.weights) != len(args.adapter):
        p.error(f"argument --weights: {len(args.weights)} weight(s) for {len(args.adapter)} "
                "adapter(s); give one each")
    if args.threads is not None:
        from .._threads import set_num_threads

        set_num_threads(args.threads)
    weighted = args.weights is not None or args.combination is not None
    if len(args.adapter) > 1 and not weighted:
        p.error(f"{len(args.adapter)} adapters need --weights (one per adapter)")
    adapter = args.adapter if weighted else args.adapter[0]
    try:
        result = merge(args.base, adapter, args.out, dtype=args.dtype, weights=args.weights,
                       combination=args.combination, progress=args.progress, sync=args.sync)
    except (LoraError, OSError) as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 1
    print(f"merged {len(result.merged)} tensors into {result.out}: {len(result.shards)} "
          f"shard(s), {result.bytes / 2**20:.1f} MiB in {result.seconds:.2f} s "
          f"({result.bytes_per_second / 2**20:.0f} MiB/s); copied {len(result.copied)} "
          f"other file(s)")
    for name, why in result.skipped:
        print(f"  not copied: {name} ({why})")
    return 0
