"""Sphinx configuration for numba_lora's documentation."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import numba_lora  # noqa: E402

project = "numba_lora"
author = "numba_lora developers"
release = numba_lora.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "numpydoc",
]
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
autodoc_member_order = "bysource"
intersphinx_mapping = {}
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"numba_lora {release}"
