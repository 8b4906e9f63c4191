"""``python -m numba_lora bench``: the arguments, their checks, and the run they drive.

Every bad argument is an argparse usage error (exit code 2, one line on
stderr) before anything is timed: a benchmark that runs for minutes should
not fail at its end on an option it could have refused at its start.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import NoReturn, TypeVar

import numba

from .cases import DEFAULT_BATCHES, DEFAULT_RANKS, DEFAULT_SHAPES, MULTI_CASES, run
from .report import describe_extras, format_table, machine_info
from .timing import cold_start_figures, memory_rows

__all__ = ["ArgumentParser", "DESCRIPTION", "add_arguments", "execute", "parser", "main"]

DESCRIPTION = "Time numba_lora against plain NumPy and the dense BLAS product."
DTYPES = ("float32", "float64")

_Parser = TypeVar("_Parser", bound=argparse.ArgumentParser)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line: ``PROG: error: MESSAGE (see --help)``.

    Subparsers inherit the class, so ``python -m numba_lora`` uses it too.
    """

    def error(self, message: str) -> NoReturn:
        """Exit with status 2 and the usage error on one line, no traceback.

        Parameters
        ----------
        message : str
            What is wrong, as argparse words it.
        """
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _shape(text):
    try:
        out_features, in_features = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 4096x4096, got {text!r}") from None
    if out_features < 1 or in_features < 1:
        raise argparse.ArgumentTypeError(f"shape must be positive, got {text!r}")
    return out_features, in_features


def _positive_ints(text):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    for v in values:
        if v < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return values


def _threads(text):
    counts = _positive_ints(text)
    # Numba's pool is sized at import (NUMBA_NUM_THREADS); it cannot grow.
    high = numba.config.NUMBA_NUM_THREADS
    for n in counts:
        if n > high:
            raise argparse.ArgumentTypeError(f"{n} threads is more than NUMBA_NUM_THREADS = {high}")
    return counts


def _dtypes(text):
    names = [d.strip() for d in text.split(",")]
    for d in names:
        if d not in DTYPES:
            raise argparse.ArgumentTypeError(f"dtype must be float32 or float64, got {d!r}")
    return names


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be finite and > 0, got {text!r}")
    return value


def _output(text):
    if text == "-":
        return text
    # Checked here, not when the file is opened after minutes of timing.
    folder = os.path.dirname(text) or "."
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"no such directory: {folder!r}")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file path")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write in directory {folder!r}")
    return text


def add_arguments(p: _Parser) -> _Parser:
    """Add the bench's options to the (sub)parser ``p``.

    Parameters
    ----------
    p : argparse.ArgumentParser
        The parser, or the ``bench`` subparser of ``python -m numba_lora``.

    Returns
    -------
    argparse.ArgumentParser
        ``p`` itself.
    """
    rows = "; ".join(f"{rows} rows over {n} adapters" for rows, n in MULTI_CASES.values())
    p.add_argument("--shape", type=_shape, action="append",
                   help="weight shape OUTxIN (repeatable; default 4096x4096)")
    p.add_argument("--rank", type=_positive_ints, default=list(DEFAULT_RANKS),
                   help="comma-separated ranks, each <= min(OUT, IN) (default 16)")
    p.add_argument("--dtype", type=_dtypes, default=["float32"],
                   help="comma-separated dtypes: float32, float64 (default float32)")
    p.add_argument("--batch", type=_positive_ints, default=list(DEFAULT_BATCHES),
                   help="comma-separated batch sizes; 1 = forward on one vector "
                        "(default 1,8,64,512)")
    p.add_argument("--threads", type=_threads, default=None,
                   help="comma-separated thread counts for Numba and BLAS, each between 1 and "
                        "NUMBA_NUM_THREADS (default: as set)")
    p.add_argument("--no-merge", action="store_true", help="skip merge/unmerge")
    p.add_argument("--no-multi", action="store_true",
                   help=f"skip the multi-adapter cases ({rows})")
    p.add_argument("--quant", choices=["nf4"], default=None,
                   help="also time QLoraLinear (NF4 base, blocksize 64) against the float32 "
                        "product, cycling over 4 layers (float32 only)")
    p.add_argument("--train", action="store_true",
                   help="also time forward_train + backward against X @ W.T + dY @ W")
    p.add_argument("--budget", type=_seconds, default=1.0,
                   help="seconds of timing per case, > 0 (default 1.0)")
    p.add_argument("--cold-start", action="store_true",
                   help="also time a fresh process's import + first forward, cache warm and cold")
    p.add_argument("--memory", action="store_true",
                   help="also measure the peak extra memory of one merge (fresh processes)")
    p.add_argument("--json", metavar="PATH", type=_output,
                   help="also write results as JSON to PATH ('-' for stdout, table to stderr)")
    return p


def parser() -> ArgumentParser:
    """The bench's parser on its own (``python -m numba_lora`` adds it as a subcommand).

    Returns
    -------
    ArgumentParser
        A parser whose errors are one-line usage errors.
    """
    return add_arguments(ArgumentParser(prog="python -m numba_lora bench",
                                        description=DESCRIPTION))


def _check_memory(shapes, p):
    """Refuse, as a usage error, a shape whose weight alone cannot fit in this machine's memory."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not on this platform: let run() find out
        return
    for out_features, in_features in shapes:
        need = out_features * in_features * 8  # the weight is drawn in float64
        if need > physical:
            p.error(f"argument --shape: a {out_features}x{in_features} weight needs "
                    f"{need / 2**30:.1f} GiB, more than this machine's {physical / 2**30:.1f} GiB")


def execute(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    """Run the bench for parsed ``args``; ``p`` (their parser) reports what they cannot mix.

    A rank above a shape's ``min(OUT, IN)`` and a shape too large for the
    machine's memory are usage errors, raised before anything is timed.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options.
    p : argparse.ArgumentParser
        The parser that parsed them (for ``p.error``).

    Returns
    -------
    int
        The exit code, 0.
    """
    shapes = args.shape or list(DEFAULT_SHAPES)
    for out_features, in_features in shapes:
        for rank in args.rank:
            if rank > min(out_features, in_features):
                p.error(f"argument --rank: rank {rank} exceeds min(OUT, IN) = "
                        f"{min(out_features, in_features)} of shape {out_features}x{in_features}")
    _check_memory(shapes, p)
    if args.quant == "nf4" and "float32" not in args.dtype:
        p.error(f"argument --quant: NF4 layers are float32 only; --dtype {','.join(args.dtype)} "
                "would time none (add float32 to --dtype)")
    try:
        results = run(shapes=shapes, ranks=args.rank, dtypes=args.dtype, batches=args.batch,
                      threads=args.threads or [None], merge=not args.no_merge,
                      multi=not args.no_multi, budget_s=args.budget, quant=args.quant,
                      train=args.train)
    except MemoryError as exc:
        p.error(f"argument --shape: not enough memory for the cases asked for ({exc})")
    report = dict(machine=machine_info(), results=[asdict(r) for r in results])
    if args.cold_start:
        report["cold_start"] = cold_start_figures()
    if args.memory:
        report["memory"] = memory_rows(shapes, args.rank, args.dtype)
    table = "\n".join([format_table(results)] + describe_extras(report))
    print(table, file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        payload = json.dumps(report, indent=2)
        if args.json == "-":
            print(payload)
        else:
            with open(args.json, "w") as fh:
                fh.write(payload + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m numba_lora bench [options]``; returns the exit code.

    Parameters
    ----------
    argv : list of str, optional
        The options; ``sys.argv[1:]`` when None.

    Returns
    -------
    int
        The exit code (a usage error exits with 2 instead).

    Examples
    --------
    >>> from numba_lora.bench.cli import main
    >>> main(["--shape", "64x32", "--rank", "4", "--batch", "1", "--budget", "0.01",
    ...       "--no-merge", "--no-multi"])                    # doctest: +SKIP
    0
    """
    p = parser()
    return execute(p.parse_args(argv), p)
