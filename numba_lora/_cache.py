"""numba_lora's compiled-code cache: kept in step with the sources, and removable.

Numba keys each cached function on its own source file only.  A kernel in
``kernels/lora.py`` that calls a helper in ``kernels/_blas.py`` would keep its
stale machine code after ``_blas.py`` (or ``_config.py``) changed.  So before
any kernel is defined, :func:`install_locator` puts a cache locator in front
of Numba's own for numba_lora's files: it keeps the directory Numba would
choose (``NUMBA_CACHE_DIR``, else ``__pycache__`` beside the source when that
is writable, else the user-wide cache directory), and stamps every cache
entry with a hash of all of numba_lora's sources and Numba's version instead
of the one file's.  Any change to any source file, or a new Numba, makes
every entry stale, and Numba compiles afresh.  Nothing is written at import.
"""

import hashlib
import sys
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
#: Where every @njit function of numba_lora lives.
_KERNELS = _PACKAGE / "kernels"
#: What compiled code can depend on: the kernels, their options, the
#: exception classes they raise.  Editing anything else (the layers, the
#: bench) leaves the cache valid.
_SOURCES = ("kernels", "_config.py", "errors.py")

__all__ = ["clear_cache", "cache_dirs", "install_locator", "source_digest"]


def _source_files():
    for name in _SOURCES:
        path = _PACKAGE / name
        yield from sorted(path.rglob("*.py")) if path.is_dir() else [path]


def source_digest():
    """A hash of the sources compiled code depends on, and of Numba's version."""
    import numba

    digest = hashlib.sha256(numba.__version__.encode())
    for path in _source_files():
        digest.update(str(path.relative_to(_PACKAGE)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _inside_kernels(py_file):
    try:
        Path(py_file).resolve().relative_to(_KERNELS)
    except (ValueError, OSError, TypeError):
        return False
    return True


def install_locator():
    """Stamp numba_lora's cache entries with :func:`source_digest` (idempotent)."""
    from numba.core import caching

    classes = caching.CacheImpl._locator_classes
    if any(getattr(cls, "_numba_lora", False) for cls in classes):
        return
    stamp = ("numba_lora", source_digest())

    class PackageLocator(caching._CacheLocator):
        """Numba's own choice of directory, numba_lora's whole-package stamp."""

        _numba_lora = True

        def __init__(self, inner):
            self._inner = inner

        def ensure_cache_path(self):
            self._inner.ensure_cache_path()

        def get_cache_path(self):
            return self._inner.get_cache_path()

        def get_source_stamp(self):
            return stamp

        def get_disambiguator(self):
            return self._inner.get_disambiguator()

        def __getattr__(self, name):  # _py_file, _lineno, ... as Numba reads them
            return getattr(self._inner, name)

        @classmethod
        def from_function(cls, py_func, py_file):
            if not _inside_kernels(py_file):
                return None
            for other in classes:
                if other is not cls:
                    inner = other.from_function(py_func, py_file)
                    if inner is not None:
                        return cls(inner)
            return None

    classes.insert(0, PackageLocator)


def _dispatchers():
    from numba.core.dispatcher import Dispatcher

    for name, module in list(sys.modules.items()):
        if module is None or not (name == "numba_lora" or name.startswith("numba_lora.")):
            continue
        for obj in list(vars(module).values()):
            if isinstance(obj, Dispatcher):
                yield obj


def cache_dirs():
    """The directories Numba keeps numba_lora's compiled code in, as Numba chose them."""
    found = set()
    for dispatcher in _dispatchers():
        path = getattr(dispatcher._cache, "cache_path", None)
        if path:
            found.add(Path(path))
    return sorted(found)


def clear_cache() -> int:
    """Delete numba_lora's cached machine code (``*.nbi`` and ``*.nbc`` files).

    Looks where Numba really keeps it: ``NUMBA_CACHE_DIR`` when set, else
    ``__pycache__`` beside each source file, or the user-wide cache directory
    for a read-only install.  The next call of each kernel compiles it again
    (a few seconds).  Do this in a process that has not yet called a kernel.
    Rarely needed: entries are stamped with a hash of the kernel sources and
    Numba's version, so stale code is never loaded.

    Returns
    -------
    int
        The number of files removed.

    See Also
    --------
    cache_dirs : Where it looks.

    Examples
    --------
    >>> import numba_lora
    >>> numba_lora.clear_cache()          # doctest: +SKIP
    42
    """
    stems = {path.stem for path in _KERNELS.rglob("*.py")}
    removed = 0
    for directory in cache_dirs():
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            if path.suffix in (".nbi", ".nbc") and path.name.split(".", 1)[0] in stems:
                try:
                    path.unlink()
                    removed += 1
                except FileNotFoundError:  # another process got there first
                    pass
    return removed
