"""``python -m numba_lora merge BASE_DIR ADAPTER_DIR [ADAPTER_DIR ...] OUT_DIR``: the checkpoint merge.

Several adapters with ``--weights W [W ...]`` (and ``--combination cat|linear``)
are combined as PEFT's ``add_weighted_adapter`` combines them, then merged.

Exit codes: 0 merged; 1 the merge was refused or failed (one line on
stderr, naming the file and the key; nothing written); 2 a usage error.
"""

import argparse
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


def add_arguments(p):
    """Add the merge command's arguments to parser ``p``."""
    p.add_argument("base", metavar="BASE_DIR",
                   help="the base checkpoint: model.safetensors, or shards and their index")
    p.add_argument("adapter", metavar="ADAPTER_DIR", nargs="+",
                   help="the PEFT adapter: adapter_config.json and adapter_model.safetensors "
                   "(several, with --weights: a weighted merge)")
    p.add_argument("out", metavar="OUT_DIR",
                   help="where the merged checkpoint goes: a new or empty directory")
    p.add_argument("--weights", type=float, nargs="+", metavar="W", default=None,
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
    return p


def execute(args, p):
    """Run the merge for parsed ``args``; returns the exit code."""
    if args.threads is not None:
        from .._threads import set_num_threads

        set_num_threads(args.threads)
    weighted = args.weights is not None or args.combination is not None
    if len(args.adapter) > 1 and not weighted:
        p.error(f"{len(args.adapter)} adapters need --weights (one per adapter)")
    adapter = args.adapter if weighted else args.adapter[0]
    try:
        result = merge(args.base, adapter, args.out, dtype=args.dtype, weights=args.weights,
                       combination=args.combination, progress=args.progress)
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
