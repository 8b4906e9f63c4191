"""Reading safetensors files with NumPy alone (no torch, no safetensors reader).

The format is small: 8 bytes of little-endian header length, a JSON header
``{key: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``, then the
data.  Parsing it here, rather than through ``safetensors.safe_open``, lets
every problem (a truncated file, a header that is not JSON, offsets past the
end, a dtype NumPy has no type for) be reported as
:class:`~numba_lora.LoraFormatError` naming the file and the tensor, and lets
a caller read only the tensors it needs from a large base-model file.
"""

import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from ..errors import LoraConfigError, LoraFormatError, LoraTypeError

__all__ = ["SafetensorsFile", "read_safetensors"]

# safetensors dtype names NumPy reads directly; stored little-endian.
_NUMPY_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1",
    "BOOL": "?",
}
# Bytes per element, to check a tensor's byte range against its shape.  The
# float8 types are known so that their sizes are checked, but not decoded.
_ITEMSIZE = {name: np.dtype(code).itemsize for name, code in _NUMPY_DTYPES.items()}
_ITEMSIZE.update({"BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1})

_METADATA = "__metadata__"


def _bf16_to_f32(buffer, shape):
    """bfloat16 bits (little-endian) to float32, exactly: bf16 is the top half of an f32."""
    bits = np.frombuffer(buffer, dtype="<u2").astype(np.uint32) << 16
    return bits.view(np.float32).reshape(shape)


def _no_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise LoraFormatError(f"has a header that names tensor {key!r} twice")
        seen[key] = value
    return seen


def as_path(path, what="path"):
    """``path`` as a :class:`~pathlib.Path`.

    LoraTypeError unless it is a str or os.PathLike; LoraConfigError if it
    holds a NUL character, which no file name can.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise LoraTypeError(f"{what} must be a str or os.PathLike, got {type(path).__name__} {path!r}")
    try:
        result = Path(path)
    except TypeError as exc:  # an os.PathLike whose __fspath__ returns bytes or junk
        raise LoraTypeError(f"{what} {path!r} is not a usable path: {exc}") from None
    if "\x00" in str(result):  # open() and mkdir() would raise a bare ValueError
        raise LoraConfigError(f"{what} {path!r} contains a NUL character")
    return result


class SafetensorsFile:
    """The header of a safetensors file, checked; tensors are read on request.

    Parameters
    ----------
    path : str or os.PathLike
        The file.

    Raises
    ------
    LoraTypeError
        If ``path`` is not a str or os.PathLike.
    LoraFormatError
        If the file is missing, a directory, or not a well-formed safetensors
        file; the message names the file (and the tensor, where one is at fault).
    """

    def __init__(self, path):
        self.path = as_path(path)
        if self.path.is_dir():
            raise LoraFormatError(f"{self.path} is a directory, not a safetensors file")
        if not self.path.is_file():
            raise LoraFormatError(f"{self.path} does not exist (expected a safetensors file)")
        with open(self.path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                raise self._error(f"is {size} bytes long, too short for a safetensors header")
            header_len = int.from_bytes(head, "little")
            if header_len > size - 8:
                raise self._error(
                    f"declares a {header_len}-byte header, but only {size - 8} bytes follow "
                    "(truncated, or not a safetensors file)"
                )
            raw = fh.read(header_len)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except LoraFormatError as exc:
            raise self._error(str(exc)) from None
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise self._error(f"has a header that is not UTF-8 JSON ({exc}); "
                              "truncated, or not a safetensors file") from None
        if not isinstance(header, dict):
            raise self._error(f"has a header that is a JSON {type(header).__name__}, not an object")
        self._data_start = 8 + header_len
        self._data_len = size - self._data_start
        self._entries = {}
        for key, info in header.items():
            if key == _METADATA:
                continue
            self._entries[key] = self._check_entry(key, info)

    def _error(self, message, key=None):
        where = f"{self.path}" if key is None else f"{self.path}: tensor {key!r}"
        return LoraFormatError(f"{where} {message}" if key is None else f"{where}: {message}")

    def _check_entry(self, key, info):
        if not isinstance(info, dict):
            raise self._error(f"has a header entry that is a JSON {type(info).__name__}, "
                              "not an object", key)
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str):
            raise self._error(f"has no dtype string in the header (got {dtype!r})", key)
        if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
            raise self._error(f"has shape {shape!r}; expected a list of integers >= 0", key)
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets))
                or offsets[0] > offsets[1]):
            raise self._error(f"has data_offsets {offsets!r}; expected [start, stop] with "
                              "0 <= start <= stop", key)
        start, stop = offsets
        if stop > self._data_len:
            raise self._error(
                f"has data_offsets [{start}, {stop}], past the end of the data "
                f"({self._data_len} bytes): the file is truncated", key)
        itemsize = _ITEMSIZE.get(dtype)
        if itemsize is not None and stop - start != math.prod(shape) * itemsize:
            raise self._error(
                f"has {stop - start} bytes of data, but dtype {dtype} and shape {tuple(shape)} "
                f"need {math.prod(shape) * itemsize}", key)
        return dtype, tuple(shape), start, stop

    def keys(self):
        """The tensor names, in header order (``__metadata__`` left out)."""
        return list(self._entries)

    def __contains__(self, key):
        return key in self._entries

    def __len__(self):
        return len(self._entries)

    def dtype(self, key):
        """The tensor's safetensors dtype name (``"F32"``, ``"BF16"``, ...)."""
        return self._entries[key][0]

    def shape(self, key):
        """The tensor's shape, from the header."""
        return self._entries[key][1]

    def read(self, key):
        """Tensor ``key`` as a writable, native-byte-order array.

        bfloat16, which NumPy has no dtype for, is widened to float32
        exactly; float8 and any other dtype NumPy cannot hold raise
        LoraFormatError naming the file and the key.
        """
        return self.read_many([key])[key]

    def read_many(self, keys):
        """``{key: array}`` for ``keys``, in one pass over the file."""
        result = {}
        with open(self.path, "rb") as fh:
            for key in keys:
                dtype, shape, start, stop = self._entries[key]
                if dtype != "BF16" and dtype not in _NUMPY_DTYPES:
                    raise self._error(
                        f"has dtype {dtype}, which numba_lora cannot read "
                        "(readable: F16, BF16, F32, F64, integer and BOOL tensors)", key)
                buffer = bytearray(stop - start)
                fh.seek(self._data_start + start)
                if fh.readinto(buffer) != len(buffer):
                    raise self._error("ends early: the file changed or is truncated", key)
                if dtype == "BF16":
                    array = _bf16_to_f32(buffer, shape)
                else:
                    array = np.frombuffer(buffer, dtype=_NUMPY_DTYPES[dtype]).reshape(shape)
                    if sys.byteorder != "little":
                        array = array.astype(array.dtype.newbyteorder("="))
                result[key] = array
        return result


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors(path):
    """``{name: ndarray}`` for every tensor of a safetensors file.

    bfloat16 tensors, which NumPy has no dtype for, are widened to float32
    exactly.  A malformed file raises :class:`~numba_lora.LoraFormatError`
    naming the file and, where one is at fault, the tensor.
    """
    file = SafetensorsFile(path)
    return file.read_many(file.keys())
