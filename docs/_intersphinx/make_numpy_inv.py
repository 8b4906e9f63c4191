"""Write numpy.inv: a Sphinx inventory of the NumPy names numba_lora's docs link to.

The docs build offline, so intersphinx reads inventories from this folder
(docs/conf.py).  Python's and Numba's are the ones their documentation
packages ship (Debian's python3.11-doc and numba-doc, see README.md here);
no package reachable offline ships NumPy's, so this script writes a small
one by hand, with the paths numpy.org/doc/stable uses.  Add a name here and
rerun it (``python docs/_intersphinx/make_numpy_inv.py``) when the docs
start to mention another.
"""

import zlib
from pathlib import Path

# (name, role, page#anchor); "$" stands for the name, as in Sphinx inventories.
ENTRIES = [
    ("numpy.ndarray", "py:class", "reference/generated/numpy.ndarray.html#$"),
    ("numpy.dtype", "py:class", "reference/generated/numpy.dtype.html#$"),
    ("numpy.random.Generator", "py:class", "reference/random/generator.html#$"),
    ("numpy.random.default_rng", "py:function", "reference/random/generator.html#$"),
    ("numpy.typing.ArrayLike", "py:data", "reference/typing.html#$"),
    ("numpy.typing.NDArray", "py:data", "reference/typing.html#$"),
    ("numpy.copyto", "py:function", "reference/generated/numpy.copyto.html#$"),
    ("numpy.matmul", "py:function", "reference/generated/numpy.matmul.html#$"),
    ("numpy.dot", "py:function", "reference/generated/numpy.dot.html#$"),
    ("numpy.isfinite", "py:data", "reference/generated/numpy.isfinite.html#$"),
]


def main():
    header = ("# Sphinx inventory version 2\n# Project: NumPy\n# Version: stable\n"
              "# The remainder of this file is compressed using zlib.\n")
    body = "".join(f"{name} {role} 1 {uri} -\n" for name, role, uri in ENTRIES)
    path = Path(__file__).with_name("numpy.inv")
    path.write_bytes(header.encode() + zlib.compress(body.encode()))
    print(f"wrote {path} ({len(ENTRIES)} names)")


if __name__ == "__main__":
    main()
