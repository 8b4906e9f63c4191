"""``python -m numba_lora``: a short demo; ``bench``: the benchmark; ``merge``: merge a checkpoint."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np

from .bench import cli as bench_cli
from .checkpoint import cli as merge_cli


def demo() -> int:
    """Build a layer, check it against NumPy, and time it against NumPy and dense BLAS."""
    t0 = time.perf_counter()
    from . import LoraLinear, __version__, bench

    out_features, in_features, rank, alpha = 4096, 4096, 16, 32.0
    print(f"numba_lora {__version__} demo: a {out_features}x{in_features} float32 layer, "
          f"rank {rank}, alpha {alpha:g}")
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((out_features, in_features)) / np.sqrt(in_features)).astype(np.float32)
    layer = LoraLinear(W, rank, alpha, seed=1)
    layer.lora_b = rng.standard_normal((out_features, rank)) * 0.01
    X = rng.standard_normal((64, in_features)).astype(np.float32)

    t = time.perf_counter()
    Y = layer(X)
    layer.merge()
    Y_merged = layer(X)
    layer.unmerge()
    print(f"import + first calls (compiling or loading cached kernels): "
          f"{time.perf_counter() - t0:.2f} s ({time.perf_counter() - t:.2f} s for the calls)")

    A, B = layer.lora_a.astype(np.float64), layer.lora_b.astype(np.float64)
    X64 = X.astype(np.float64)
    reference = X64 @ W.astype(np.float64).T + layer.scaling * (X64 @ A.T) @ B.T
    scale = np.abs(reference).max()
    print(f"forward_batch(64 rows) vs float64 NumPy: max error {np.abs(Y - reference).max() / scale:.1e} "
          f"(relative to max |y|); merged forward: {np.abs(Y_merged - reference).max() / scale:.1e}")
    print(f"after merge + unmerge, W differs from the original by at most "
          f"{np.abs(layer.weight - W).max():.1e}")
    print("\ntiming (medians, interleaved; ratios to the dense product on the same W):",
          flush=True)
    results = bench.run(batches=(1, 64), budget_s=0.5)
    print(bench.format_table(results))
    print("\nfull benchmark: python -m numba_lora bench --help")
    return 0


def version() -> str:
    """``numba_lora.__version__``: the installed distribution's version (pyproject's)."""
    from . import __version__

    return __version__


def parser() -> argparse.ArgumentParser:
    """``python -m numba_lora [--version] [bench ... | merge ...]``; without a command, the demo."""
    p = bench_cli.ArgumentParser(
        prog="python -m numba_lora",
        description="Without a command: a short demo on a 4096x4096 float32 layer (about a "
                    "minute): checks against NumPy in float64, times against NumPy and BLAS.",
    )
    p.add_argument("--version", action="version", version=f"numba_lora {version()}")
    commands = p.add_subparsers(dest="command", metavar="COMMAND")
    bench = commands.add_parser("bench", help="benchmark (see 'bench --help')",
                                description=bench_cli.DESCRIPTION)
    bench_cli.add_arguments(bench)
    bench.set_defaults(handler=lambda args: bench_cli.execute(args, bench))
    merge = commands.add_parser("merge", help="merge a PEFT adapter into a checkpoint "
                                "(see 'merge --help')", description=merge_cli.DESCRIPTION)
    merge_cli.add_arguments(merge)
    merge.set_defaults(handler=lambda args: merge_cli.execute(args, merge))
    return p


def _check_leading_options(p: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """A one-line usage error for an option before the command (``--threads 2``).

    argparse would take the option's value for the command and answer
    "invalid choice: '2'"; this names the command the option belongs to.
    """
    commands = next(a.choices for a in p._actions if isinstance(a, argparse._SubParsersAction))
    for arg in argv:
        if not arg.startswith("-") or arg == "-":
            return  # the command (or a stray word argparse will name)
        name = arg.split("=", 1)[0]
        if name in p._option_string_actions:
            continue
        owners = [c for c, sub in commands.items() if name in sub._option_string_actions]
        if owners:
            p.error(f"{name} is an option of {' and '.join(repr(c) for c in owners)}: it goes "
                    f"after the command (python -m numba_lora {owners[0]} {name} ...)")
        p.error(f"unrecognized argument {name} (the demo takes no options)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (argparse exits on --help, --version, errors)."""
    p = parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    _check_leading_options(p, argv)
    args = p.parse_args(argv)
    if args.command is None:
        return demo()
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
