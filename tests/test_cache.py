"""The compiled-code cache: where Numba keeps it, stale when any source changes, removable."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

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


CLEAR = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np
    import numba_lora
    from numba_lora import _cache, kernels
    kernels.forward(np.ones((3, 4)), np.ones((1, 4)), np.ones((3, 1)), 1.0, np.ones(4),
                    np.empty(3))
    dirs = _cache.cache_dirs()
    assert dirs, "no cached dispatcher found"
    root = Path(sys.argv[1]).resolve()
    assert all(d.resolve().is_relative_to(root) for d in dirs), dirs
    # A removable file of ours, and one that is not ours, beside the real entries.
    ours, other = dirs[0] / "lora.some_kernel-1.py311.nbi", dirs[0] / "keep.txt"
    ours.write_bytes(b"x")
    other.write_text("not Numba's")
    print(numba_lora.clear_cache(), ours.exists(), other.exists(),
          sum(1 for d in dirs for p in d.glob("*.nb[ic]")))
""")


def test_clear_cache_uses_the_directory_numba_uses(tmp_path):
    # In a fresh interpreter whose NUMBA_CACHE_DIR is a temporary directory:
    # clearing the cache the suite itself runs on would make every later
    # process (the hostile suite's subprocesses, CI's later passes) compile
    # every kernel again.
    cache_dir = tmp_path / "cache"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    result = subprocess.run([sys.executable, "-c", CLEAR, str(cache_dir)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    removed, ours_left, other_left, entries_left = result.stdout.split()
    assert int(removed) >= 3  # ours, and the forward kernel's index and data
    assert (ours_left, other_left, entries_left) == ("False", "True", "0")


def test_cache_dirs_are_where_this_process_caches():
    from numba_lora import kernels

    kernels.forward(np.ones((3, 4)), np.ones((1, 4)), np.ones((3, 1)), 1.0, np.ones(4),
                    np.empty(3))
    dirs = _cache.cache_dirs()
    here = Path(kernels.lora.forward._cache.cache_path)
    assert here in dirs
    assert any(here.glob("lora.forward-*.nbi"))


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
