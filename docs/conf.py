"""Sphinx configuration for numba_lora's documentation."""

import os
import re
import sys

sys.path.insert(0, os.path.abspath(".."))

import numba_lora  # noqa: E402

project = "numba_lora"
author = "the numba_lora developers"
copyright = "2026, the numba_lora developers · BSD-3-Clause license"  # noqa: A001 (Sphinx's name)
release = numba_lora.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "numpydoc",
]
# Each class opens with a summary table of its attributes and methods, linked
# to their entries below; the Attributes section is such a table too, so a
# property documented as a member is not rendered twice.
numpydoc_show_class_members = True
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = False
numpydoc_xref_param_type = True
numpydoc_xref_aliases = {
    "ndarray": "numpy.ndarray",
    "array_like": "numpy.typing.ArrayLike",
    "dtype": "numpy.dtype",
    "numpy.random.Generator": "numpy.random.Generator",
    "os.PathLike": "os.PathLike",
    "LoraConfig": "numba_lora.LoraConfig",
    "LoraLinear": "numba_lora.LoraLinear",
    "LoraAdapter": "numba_lora.LoraAdapter",
    "AdapterSummary": "numba_lora.AdapterSummary",
}
# Words in "Parameters" type specs that are not names to link.
numpydoc_xref_ignore = "all"
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Signatures show the hints as written (``ArrayLike``), not expanded unions.
autodoc_type_aliases = {
    "ArrayLike": "numpy.typing.ArrayLike",
    "NDArray": "numpy.typing.NDArray",
}
autosummary_generate = False

# The docs build offline (CI): intersphinx reads inventories kept in the
# repository (docs/_intersphinx/README.md says where each comes from).
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", "_intersphinx/python.inv"),
    "numpy": ("https://numpy.org/doc/stable", "_intersphinx/numpy.inv"),
    "numba": ("https://numba.readthedocs.io/en/stable", "_intersphinx/numba.inv"),
}

exclude_patterns = ["_build", "_intersphinx"]
html_theme = "furo"
html_title = f"numba_lora {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_show_sphinx = True

# A property documented with an annotation needs no "type: " prefix in its
# docstring (``int: Rank of the update.``): drop it, or the type shows twice.
_TYPE_PREFIX = re.compile(r"^[\w.]+(?:\[[^\]]*\])?(?: of [\w.]+)?: (?=[A-Z`(])")


def _drop_type_prefix(app, what, name, obj, options, lines):
    if what == "property":
        for i, line in enumerate(lines):
            if line.strip():  # the summary line (numpydoc puts a blank line first)
                lines[i] = _TYPE_PREFIX.sub("", line, count=1)
                break


# autodoc_type_aliases leaves "TypeAliasForwardRef('numpy.typing.ArrayLike')"
# in signatures where an alias sits inside a union or a generic
# (``ArrayLike | None``, ``Mapping[str, ArrayLike]``): show the alias's name.
_ALIAS_REF = re.compile(r"TypeAliasForwardRef\('([\w.]+)'\)")


def _alias_names(app, what, name, obj, options, signature, return_annotation):
    if signature:
        signature = _ALIAS_REF.sub(r"\1", signature)
    if return_annotation:
        return_annotation = _ALIAS_REF.sub(r"\1", return_annotation)
    return signature, return_annotation


def setup(app):
    app.connect("autodoc-process-docstring", _drop_type_prefix)
    app.connect("autodoc-process-signature", _alias_names)
