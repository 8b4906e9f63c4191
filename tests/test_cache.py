"""The compiled-code cache follows the sources, and clear_cache empties it."""

from pathlib import Path

import numba_lora
from numba_lora import _cache


def _numba_dir(tmp_path):
    package = Path(numba_lora.__file__).resolve().parent
    return tmp_path / package.relative_to(package.anchor)


def test_stale_cache_is_cleared_and_tagged(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    directory = _numba_dir(tmp_path)
    directory.mkdir(parents=True)
    stale = [directory / "kernels.forward-1.py311.nbi", directory / "kernels.forward-1.py311.1.nbc"]
    for path in stale:
        path.write_bytes(b"old")
    (directory / _cache._TAG_NAME).write_text("written for other sources")
    _cache.ensure_fresh_cache()
    assert not any(path.exists() for path in stale)
    assert (directory / _cache._TAG_NAME).read_text() == _cache._source_digest()
    # A matching tag keeps what is there.
    keep = directory / "kernels.merge-2.py311.nbi"
    keep.write_bytes(b"current")
    _cache.ensure_fresh_cache()
    assert keep.exists()


def test_clear_cache_removes_compiled_files(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    directory = _numba_dir(tmp_path)
    directory.mkdir(parents=True)
    (directory / "a.nbi").write_bytes(b"x")
    (directory / "a.1.nbc").write_bytes(b"x")
    (directory / "keep.txt").write_text("not Numba's")
    assert numba_lora.clear_cache() >= 2
    assert sorted(p.name for p in directory.iterdir()) == ["keep.txt"]
