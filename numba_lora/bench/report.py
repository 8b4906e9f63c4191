"""How the bench reports: the table, times in a unit that fits, machine info, progress.

:func:`describe_extras` is shared with ``docs/make_performance.py``, so the
memory and cold-start figures read the same in the terminal and in the docs.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any

import numba
import numpy as np

if TYPE_CHECKING:  # cases.py imports this module
    from .cases import Result

__all__ = ["format_table", "format_time", "describe_extras", "machine_info", "Progress"]

_UNITS = (("s", 1.0), ("ms", 1e-3), ("us", 1e-6))


def format_time(seconds: float) -> str:
    """``seconds`` in s, ms or us, whichever puts the value at 1 or above (us at most).

    Four significant digits: 3 decimals below 10, 2 below 100, else 1.

    Parameters
    ----------
    seconds : float
        A duration.

    Returns
    -------
    str
        The duration with its unit.

    See Also
    --------
    format_table : Uses it for every time.

    Examples
    --------
    >>> format_time(0.0123), format_time(4.5e-6), format_time(2.0)
    ('12.30 ms', '4.500 us', '2.000 s')
    """
    seconds = float(f"{seconds:.4g}")  # so that 0.99996 ms reads 1.000 ms, not 1000.0 us
    for unit, scale in _UNITS:
        if seconds >= scale:
            break
    value = seconds / scale
    decimals = 3 if value < 10 else 2 if value < 100 else 1
    return f"{value:.{decimals}f} {unit}"


def format_table(results: Sequence[Result]) -> str:
    """Format results as a plain-text table.

    Times are medians; the last lines say what each baseline timed.

    Parameters
    ----------
    results : list of Result
        Rows from :func:`numba_lora.bench.run`.

    Returns
    -------
    str
        The table, lines joined by newlines.
    """
    header = (f"{'operation':<14}{'shape':>11}{'rank':>5}{'dtype':>8}{'batch':>6}{'thr':>4}"
              f"{'numba_lora':>12}{'numpy':>11}{'baseline':>11}{'lora/base':>11}{'numpy/base':>12}")
    lines = [header, "-" * len(header)]
    baselines = []
    for r in results:
        batch = "-" if r.op in ("merge", "unmerge") else str(r.batch)
        if r.baseline not in baselines:
            baselines.append(r.baseline)
        lines.append(
            f"{r.op:<14}{f'{r.out_features}x{r.in_features}':>11}{r.rank:>5}{r.dtype:>8}"
            f"{batch:>6}{r.threads:>4}{format_time(r.numba_lora_s):>12}"
            f"{format_time(r.numpy_s):>11}{format_time(r.dense_s):>11}"
            f"{r.ratio:>10.3f}x{r.numpy_ratio:>11.3f}x"
        )
    for r in results:
        if r.peft_s is not None:
            lines.append(f"PEFT adapter_names= forward, {r.op} {r.out_features}x{r.in_features} "
                         f"r={r.rank}: {format_time(r.peft_s)}, {r.peft_ratio:.3f}x PEFT's "
                         f"one-adapter batch ({format_time(r.peft_single_s)})")
    notes = {
        "dense": "forward rows: the dense W @ x / X @ W.T into a preallocated output",
        "copy of W": "merge rows: np.copyto of W (one read and one write of W)",
        "dense float32": ("qlora_forward rows (NF4 base, float32 factors): the float32 "
                          "W @ x / X @ W.T on the same shape; both sides cycle over "
                          "4 layers so neither sits in the cache"),
        "X @ W.T and dY @ W": ("train rows (forward_train + backward with dX): the two dense "
                               "products X @ W.T and dY @ W into preallocated outputs"),
    }
    lines.append("times are medians; baseline =")
    for name in baselines:
        lines.append("  " + notes.get(name, f"multi rows: a single-adapter forward_batch of the "
                                              f"same rows ({name})"))
    return "\n".join(lines)


def describe_extras(report: dict[str, Any]) -> list[str]:
    """Sentences for the memory and cold-start figures of a report, if it has them.

    Shared by the bench's table and ``docs/make_performance.py``, so the
    figures read the same in the terminal and in the docs.

    Parameters
    ----------
    report : dict
        The bench's JSON report; its ``memory`` and ``cold_start`` entries
        are read when present.

    Returns
    -------
    list of str
        One sentence per figure.
    """
    lines = []
    for row in report.get("memory", []):
        lines.append(
            f"Peak extra memory of one merge, {row['out_features']}x{row['in_features']} "
            f"rank {row['rank']} {row['dtype']} (growth of peak RSS in a fresh process): "
            f"numba_lora {row['numba_lora_extra_bytes'] / 2**20:.2f} MiB "
            f"({100 * row['numba_lora_extra_fraction']:.2f}% of W's bytes), NumPy's "
            f"W += s * (B @ A) {row['numpy_extra_bytes'] / 2**20:.1f} MiB "
            f"({100 * row['numpy_extra_fraction']:.0f}% of W's bytes)."
        )
    if "cold_start" in report:
        cs = report["cold_start"]
        lines.append(
            f"Cold start, a fresh process importing numba_lora and running the first "
            f"forward: {cs['warm_cache_s']:.2f} s with a warm cache, "
            f"{cs['cold_cache_s']:.2f} s compiling from scratch."
        )
    return lines


def machine_info() -> dict[str, Any]:
    """What the figures were measured on.

    Returns
    -------
    dict
        Python, NumPy, SciPy and Numba versions, machine, CPU count,
        Numba's thread count and threading layer, and the BLAS library
        and its thread count.
    """
    import scipy

    from ..kernels._blas import PROVIDER, blas_threads

    return dict(
        python=platform.python_version(), numpy=np.__version__, scipy=scipy.__version__,
        numba=numba.__version__, machine=platform.machine(), cpus=os.cpu_count(),
        processor=platform.processor() or platform.machine(),
        numba_threads=numba.get_num_threads(),
        threading_layer=_threading_layer(), blas=PROVIDER, blas_threads=blas_threads(),
    )


def _threading_layer():
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return None


class Progress:
    """A one-line progress bar on stderr (a line per step when not a terminal).

    Parameters
    ----------
    total : int
        The number of steps.
    stream : file-like, optional
        Where to write; ``sys.stderr`` by default.
    """

    def __init__(self, total: int, stream: IO[str] | None = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.total, self.done = total, 0
        self.tty = self.stream.isatty()

    def step(self, label: str) -> None:
        """Show that the step ``label`` starts.

        Parameters
        ----------
        label : str
            What the step does.
        """
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        line = f"[{bar}] {self.done}/{self.total} {label}"
        if self.tty:
            self.stream.write("\r" + line.ljust(78)[:78])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.done += 1

    def close(self) -> None:
        """Clear the bar from a terminal (nothing to do otherwise)."""
        if self.tty:
            self.stream.write("\r" + " " * 78 + "\r")
            self.stream.flush()
