"""numba_lora's compiled-code cache: kept in step with the source, and removable.

Numba keys each cached function on its own file's timestamp only.  A kernel
in ``kernels.py`` that calls a helper in ``_blas.py`` would keep its stale
machine code after ``_blas.py`` (or ``_config.py``) changed.  So at import,
before any kernel is loaded, :func:`ensure_fresh_cache` compares a hash of
every source file (and the Numba version) with the one stored beside the
cache, and clears the cache when they differ.
"""

import hashlib
import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_TAG_NAME = "numba_lora_sources.sha256"


def _cache_dirs():
    custom = os.environ.get("NUMBA_CACHE_DIR")
    if custom:
        # Numba mirrors the source tree below NUMBA_CACHE_DIR.
        yield Path(custom) / _PACKAGE.relative_to(_PACKAGE.anchor)
    yield _PACKAGE / "__pycache__"


def clear_cache():
    """Delete numba_lora's cached machine code (``*.nbi`` and ``*.nbc`` files).

    The next call of each kernel compiles it again (a few seconds).  Do this
    in a process that has not yet called any kernel.

    Returns
    -------
    int
        The number of files removed.
    """
    return sum(_clear_dir(d) for d in _cache_dirs() if d.is_dir())


def _source_digest():
    import numba

    digest = hashlib.sha256(numba.__version__.encode())
    for path in sorted(_PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(_PACKAGE)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_fresh_cache():
    """Clear the cache if it was written for other sources; never raises."""
    try:
        digest = _source_digest()
        for directory in _cache_dirs():
            tag = directory / _TAG_NAME
            if directory.is_dir() and tag.is_file() and tag.read_text() == digest:
                continue
            if directory.is_dir():
                _clear_dir(directory)
            directory.mkdir(parents=True, exist_ok=True)
            tag.write_text(digest)
    except OSError:
        pass  # read-only install: Numba then cannot cache either


def _clear_dir(directory):
    removed = 0
    for pattern in ("*.nbi", "*.nbc"):
        for path in directory.glob(pattern):
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:  # another process got there first
                pass
    return removed
