"""The compiled-code cache: where Numba keeps it, stale when any source changes, removable."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numba_lora
from numba_lora import _cache

PACKAGE = Path(numba_lora.__file__).resolve().parent

# Runs in a fresh interpreter: imports numba_lora from sys.argv[1], calls a
# kernel, prints how many cached functions were loaded vs compiled, and
# the cache directories.
SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    import numba_lora
    from numba_lora import _cache, kernels
    W = np.ones((3, 4), np.float32)
    kernels.forward(W, np.ones((1, 4), np.float32), np.ones((3, 1), np.float32), 1.0,
                    np.ones(4, np.float32), np.empty(3, np.float32))
    stats = kernels.lora.forward.stats
    print(stats.cache_hits.most_common(1)[0][1] if stats.cache_hits else 0,
          stats.cache_misses.most_common(1)[0][1] if stats.cache_misses else 0)
    print(*_cache.cache_dirs(), sep="\\n")
""")


def _copy_package(tmp_path):
    root = tmp_path / "site"
    shutil.copytree(PACKAGE, root / "numba_lora", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _run(root, cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(root)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split("\n")
    hits, misses = map(int, lines[0].split())
    return hits, misses, [line for line in lines[1:] if line]


def test_cache_follows_every_source_file(tmp_path):
    root = _copy_package(tmp_path)
    cache_dir = tmp_path / "cache"
    assert _run(root, cache_dir)[:2] == (0, 1)  # compiled
    assert _run(root, cache_dir)[:2] == (1, 0)  # loaded
    # A change to a helper module, not the kernel's own file, makes it stale.
    helper = root / "numba_lora" / "kernels" / "_blas.py"
    helper.write_text(helper.read_text() + "\n# changed\n")
    assert _run(root, cache_dir)[:2] == (0, 1)
    # Nothing was written beside the sources: NUMBA_CACHE_DIR was used.
    assert not list((root / "numba_lora").rglob("*.nbi"))
    assert list(cache_dir.rglob("*.nbi"))


def test_clear_cache_uses_the_directory_numba_uses(tmp_path, monkeypatch):
    dirs = _cache.cache_dirs()
    assert dirs, "no cached dispatcher found"
    for directory in dirs:
        assert directory.is_dir()
    # A removable file of ours, and one that is not ours, in one of them.
    directory = dirs[0]
    ours = directory / "lora.some_kernel-1.py311.nbi"
    other = directory / "keep.txt"
    ours.write_bytes(b"x")
    other.write_text("not Numba's")
    try:
        assert numba_lora.clear_cache() >= 1
        assert not ours.exists()
        assert other.exists()
    finally:
        other.unlink()


def test_import_writes_no_files(tmp_path):
    root = _copy_package(tmp_path)
    before = sorted(p for p in root.rglob("*") if "__pycache__" not in p.parts)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), PYTHONDONTWRITEBYTECODE="1")
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(root)!r}); "
                    "import numba_lora"], env=env, check=True, timeout=600)
    after = sorted(p for p in root.rglob("*") if "__pycache__" not in p.parts)
    assert before == after


def test_disabled_jit_is_refused_at_import():
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    result = subprocess.run([sys.executable, "-c", "import numba_lora"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "LoraEnvironmentError" in result.stderr and "NUMBA_DISABLE_JIT" in result.stderr
