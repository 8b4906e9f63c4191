"""Removing numba_lora's compiled-code cache."""

import os
from pathlib import Path


def _cache_dirs():
    package = Path(__file__).resolve().parent
    custom = os.environ.get("NUMBA_CACHE_DIR")
    if custom:
        # Numba mirrors the source tree below NUMBA_CACHE_DIR.
        yield Path(custom) / package.relative_to(package.anchor)
    yield package / "__pycache__"


def clear_cache():
    """Delete numba_lora's cached machine code (``*.nbi`` and ``*.nbc`` files).

    The next call of each kernel compiles it again (a few seconds).  Do this
    in a process that has not yet called any kernel.

    Returns
    -------
    int
        The number of files removed.
    """
    removed = 0
    for directory in _cache_dirs():
        if not directory.is_dir():
            continue
        for pattern in ("*.nbi", "*.nbc"):
            for path in directory.glob(pattern):
                path.unlink()
                removed += 1
    return removed
