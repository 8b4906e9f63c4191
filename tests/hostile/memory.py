"""Arrays that sit against ``PROT_NONE`` guard pages, with canary bytes beside them.

Each :class:`Region` is one anonymous ``mmap``: a guard page, the data pages,
a guard page.  The array is placed either so that its last byte is the last
byte before the trailing guard page (an overrun faults at the first byte past
the end) or so that it starts right after the leading guard page (an underrun
faults).  The rest of the data pages is filled with canary bytes, compared
after the call, so a stray write inside the page is caught as well.

An input can also be made physically read-only (``PROT_READ`` on its data
pages, the array's flags still writable, so Numba sees the usual type): a
kernel that writes to an input then faults instead of passing quietly.

A fault kills the process; the cases run in a subprocess (``run_cases.py``),
so a fault is a failed test that names the case, not a dead test run.

Where ``mprotect`` is not available (Windows), regions have canaries only.
"""

import ctypes
import ctypes.util
import mmap
import sys

import numpy as np

__all__ = ["PAGE", "GUARDED", "Region", "place"]

PAGE = mmap.PAGESIZE
_PROT_NONE, _PROT_READ, _PROT_WRITE = 0, 1, 2
CANARY = 0xA5


def _find_mprotect():
    if sys.platform.startswith("win"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.mprotect
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MPROTECT = _find_mprotect()
#: Whether guard pages are in force (else canaries only).
GUARDED = _MPROTECT is not None


def _protect(address, length, prot):
    if _MPROTECT is None or length == 0:
        return
    if _MPROTECT(address, length, prot) != 0:
        raise OSError(ctypes.get_errno(), "mprotect failed")


class Region:
    """One mmap holding one array between guard pages; see the module docstring.

    Parameters
    ----------
    shape, dtype
        Of the base array (C order).
    at_end : bool
        Put the array's last byte against the trailing guard page (else its
        first byte against the leading one).
    """

    def __init__(self, shape, dtype, at_end=True):
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self.data_pages = max(1, -(-nbytes // PAGE))
        self.map = mmap.mmap(-1, (self.data_pages + 2) * PAGE)
        view = (ctypes.c_char * len(self.map)).from_buffer(self.map)
        self.address = ctypes.addressof(view)
        del view  # release the export, or the map could never be closed
        data = self.data_pages * PAGE
        self.map[PAGE:PAGE + data] = bytes([CANARY]) * data
        _protect(self.address, PAGE, _PROT_NONE)
        _protect(self.address + PAGE + data, PAGE, _PROT_NONE)
        self.offset = PAGE + data - nbytes if at_end else PAGE
        self.nbytes = nbytes
        self.array = np.ndarray(shape, dtype, buffer=self.map, offset=self.offset)
        self.readonly_pages = False

    def protect_readonly(self):
        """Make the data pages read-only in the MMU (the array's flags stay as they are)."""
        _protect(self.address + PAGE, self.data_pages * PAGE, _PROT_READ)
        self.readonly_pages = True

    def snapshot(self):
        """The bytes of the data pages (array and canaries)."""
        return bytes(self.map[PAGE:PAGE + self.data_pages * PAGE])

    def canaries_intact(self, before, after):
        """True if every byte outside the array's own bytes is unchanged."""
        lo = self.offset - PAGE
        hi = lo + self.nbytes
        return before[:lo] == after[:lo] and before[hi:] == after[hi:]


def place(values, at_end=True, readonly_pages=False, layout="C"):
    """A copy of ``values`` in a guarded :class:`Region`; returns (array, region).

    ``layout``: ``"C"``; ``"F"`` (the transpose of a guarded C array, so
    Numba types it as F-ordered); ``"strided"`` (every other element of a
    guarded array twice as long along the last axis, so Numba types it as
    ``A`` layout); its last element is still the region's last.
    """
    values = np.asarray(values)
    if layout == "F" and values.ndim >= 2:
        region = Region(values.T.shape, values.dtype, at_end)
        region.array[...] = values.T
        array = region.array.T
    elif layout == "strided" and values.ndim >= 1 and values.shape[-1] > 1:
        shape = values.shape[:-1] + (2 * values.shape[-1],)
        region = Region(shape, values.dtype, at_end)
        region.array[...] = 0
        array = region.array[..., 1::2]
        array[...] = values
    else:
        region = Region(values.shape, values.dtype, at_end)
        region.array[...] = values
        array = region.array
    if readonly_pages:
        region.protect_readonly()
    return array, region
