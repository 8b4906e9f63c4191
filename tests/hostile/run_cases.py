"""Run groups of hostile cases in this process; print one JSON line per case.

    python tests/hostile/run_cases.py GROUP [GROUP ...] [--seed N] [--limit N]

Before each case a ``{"start": i, ...}`` line names it, so that when the
process dies (a segfault from an out-of-bounds access, an abort) the parent
knows which case killed it.  After it a ``{"i": i, "outcome": ...}`` line
gives the classification (see ``harness.execute``).  The exit status is 0
when the cases ran, whatever their outcomes: the parent judges those.
"""

import argparse
import faulthandler
import gc
import os
import sys
import time
import warnings
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/: reference.py and the hostile package

import numpy as np  # noqa: E402

from hostile import all_groups  # noqa: E402
from hostile.harness import emit, execute  # noqa: E402


def seed_for(group, seed):
    return zlib.crc32(f"{group}:{seed}".encode())


def run(group, seed, limit, stream):
    rng = np.random.default_rng(seed_for(group, seed))
    start = time.perf_counter()
    for i, case in enumerate(all_groups()[group](rng)):
        if limit is not None and i >= limit:
            break
        emit(stream, {"start": i, "group": group, "area": case.area, "what": case.what})
        outcome, error, problems = execute(case)
        record = {"i": i, "group": group, "area": case.area, "expect": case.expect,
                  "outcome": outcome}
        if error:
            record["error"] = error
        if case.sig:
            record["sig"] = case.sig
        if problems:
            record["what"] = case.what
            record["detail"] = "; ".join(problems)[:1500]
        emit(stream, record)
        del case
        if i % 256 == 255:
            gc.collect()  # free guarded regions held by reference cycles
    emit(stream, {"done": group, "seconds": round(time.perf_counter() - start, 2)})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="+", choices=sorted(all_groups()))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None)
    options = parser.parse_args(argv)
    faulthandler.enable()
    warnings.simplefilter("ignore")  # NumPy's cast warnings for hostile values are expected
    np.seterr(all="ignore")
    for group in options.groups:
        run(group, options.seed, options.limit, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
