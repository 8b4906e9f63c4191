"""``python -m numba_lora bench``: numba_lora beside plain NumPy and the dense BLAS call.

Each case times three things on the same arrays, interleaved (A B C, then
C B A, ...) so that machine noise falls on all three alike, and reports
medians and their ratios to the baseline (the dense product for forward,
a copy of W for merge).

- :mod:`~numba_lora.bench.timing`: how: interleaved medians, thread
  counts, peak memory and cold start in fresh processes;
- :mod:`~numba_lora.bench.cases`: what: the forward, merge and
  multi-adapter cases, and :func:`run` over a grid of them;
- :mod:`~numba_lora.bench.report`: the table, machine info, the memory and
  cold-start sentences;
- :mod:`~numba_lora.bench.cli`: the command's arguments and ``main``.
"""

from .cases import (
    ALPHA,
    DEFAULT_BATCHES,
    DEFAULT_RANKS,
    DEFAULT_SHAPES,
    MULTI_CASES,
    Result,
    run,
    run_case,
)
from .cli import main, parser
from .report import describe_extras, format_table, format_time, machine_info
from .timing import cold_start, merge_peak_extra_bytes

__all__ = [
    "Result",
    "run_case",
    "run",
    "format_table",
    "format_time",
    "describe_extras",
    "machine_info",
    "cold_start",
    "merge_peak_extra_bytes",
    "main",
    "parser",
    "ALPHA",
    "DEFAULT_SHAPES",
    "DEFAULT_RANKS",
    "DEFAULT_BATCHES",
    "MULTI_CASES",
]
