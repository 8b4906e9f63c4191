"""Packaging: one version, written once; the type marker ships with the package."""

import importlib.metadata
from pathlib import Path

import numba_lora


def test_version_comes_from_the_installed_metadata():
    assert numba_lora.__version__ == importlib.metadata.version("numba_lora")


def test_version_without_metadata(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert numba_lora._version() == "0+unknown"


def test_py_typed_marker_is_in_the_package():
    assert (Path(numba_lora.__file__).parent / "py.typed").is_file()
