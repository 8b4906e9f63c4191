"""Reading safetensors files with NumPy alone (no torch, no safetensors reader).

The format is small: 8 bytes of little-endian header length, a JSON header
``{key: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``, then the
data.  Parsing it here, rather than through ``safetensors.safe_open``, lets
every problem (a truncated file, a header that is not JSON, offsets past the
end, a dtype NumPy has no type for) be reported as
:class:`~numba_lora.LoraFormatError` naming the file and the tensor, and lets
a caller read only the tensors it needs from a large base-model file.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import LoraConfigError, LoraFormatError, LoraTypeError

__all__ = ["SafetensorsFile", "ShardedSafetensors", "open_weights", "read_index",
           "read_safetensors"]

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

    def __init__(self, path: str | os.PathLike[str]) -> None:
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
        self._size = size
        self._data_start = 8 + header_len
        self._data_len = size - self._data_start
        self._entries = {}
        for key, info in header.items():
            if key == _METADATA:
                continue
            self._entries[key] = self._check_entry(key, info)
        self._check_coverage()

    def _check_coverage(self):
        # The format wants the data covered exactly, as the safetensors
        # library checks: tensors in offset order, each starting where the
        # last ended (no overlap: no tensor read from another's bytes; no
        # hole), and nothing after the last (no polyglot file).  Empty
        # tensors take no bytes and may sit at any boundary.
        end, previous = 0, None
        for key, (_, _, start, stop) in sorted(self._entries.items(),
                                               key=lambda item: item[1][2:]):
            if start < end:
                raise self._error(
                    f"has data_offsets [{start}, {stop}], which overlap tensor {previous!r}'s "
                    f"(ending at byte {end}): not a well-formed safetensors file", key)
            if start > end:
                raise self._error(
                    f"starts at byte {start} of the data, leaving a hole after byte {end}: "
                    "not a well-formed safetensors file", key)
            end, previous = stop, key
        if self._data_len != end:
            raise self._error(
                f"has {self._data_len - end} bytes after its last tensor: not a well-formed "
                "safetensors file")

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

    @property
    def size(self) -> int:
        """int: The file's size in bytes, when its header was read."""
        return self._size

    @property
    def data_start(self) -> int:
        """int: Where the data begins in the file: 8 bytes of length, then the header."""
        return self._data_start

    def data_offsets(self, key: str) -> tuple[int, int]:
        """``(start, stop)`` of tensor ``key``'s bytes, relative to :attr:`data_start`.

        Parameters
        ----------
        key : str
            A tensor name the header holds.

        Returns
        -------
        tuple of int
            The byte range ``(start, stop)``.
        """
        return self._entries[key][2:]

    def file_of(self, key: str) -> Path:
        """The file that holds tensor ``key``: this one (as for a sharded checkpoint).

        Parameters
        ----------
        key : str
            A tensor name the header holds.

        Returns
        -------
        pathlib.Path
            :attr:`path`.
        """
        return self.path

    def keys(self) -> list[str]:
        """The tensor names, in header order (``__metadata__`` left out).

        Returns
        -------
        list of str
            A new list.
        """
        return list(self._entries)

    def __contains__(self, key):
        return key in self._entries

    def __len__(self):
        return len(self._entries)

    def dtype(self, key: str) -> str:
        """The tensor's safetensors dtype name (``"F32"``, ``"BF16"``, ...).

        Parameters
        ----------
        key : str
            A tensor name the header holds.

        Returns
        -------
        str
            The dtype name as the header spells it.
        """
        return self._entries[key][0]

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape, from the header.

        Parameters
        ----------
        key : str
            A tensor name the header holds.

        Returns
        -------
        tuple of int
            The shape (``()`` for a scalar).
        """
        return self._entries[key][1]

    def read(self, key: str) -> np.ndarray:
        """Tensor ``key`` as a writable, native-byte-order array.

        bfloat16, which NumPy has no dtype for, is widened to float32
        exactly; float8 and any other dtype NumPy cannot hold raise
        LoraFormatError naming the file and the key.

        Parameters
        ----------
        key : str
            A tensor name the header holds.

        Returns
        -------
        ndarray
            A new array of the tensor's shape.
        """
        return self.read_many([key])[key]

    def read_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        """``{key: array}`` for ``keys``, in one pass over the file.

        Parameters
        ----------
        keys : iterable of str
            Tensor names the header holds.

        Returns
        -------
        dict[str, ndarray]
            New arrays, as :meth:`read` gives them, in the order of ``keys``.
        """
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


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """``{name: ndarray}`` for every tensor of a safetensors file.

    bfloat16 tensors, which NumPy has no dtype for, are widened to float32
    exactly.  A malformed file raises :class:`~numba_lora.LoraFormatError`
    naming the file and, where one is at fault, the tensor.

    Parameters
    ----------
    path : str or os.PathLike
        The file.

    Returns
    -------
    dict[str, ndarray]
        Every tensor, in header order.
    """
    file = SafetensorsFile(path)
    return file.read_many(file.keys())


# ------------------------------------------------------------- sharded checkpoints
#: The suffix of a Hugging Face checkpoint's shard index (``model.safetensors.index.json``).
INDEX_SUFFIX = ".safetensors.index.json"


def _plain_name(name):
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
            and "\\" not in name and "\x00" not in name and ":" not in name
            and not os.path.isabs(name))


def read_index(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``weight_map`` ``{tensor name: shard file name}`` of a safetensors index file.

    Hugging Face writes one beside the shards of a checkpoint too large for
    one file (``model.safetensors.index.json`` naming
    ``model-00001-of-00002.safetensors``, ...).

    Parameters
    ----------
    path : str or os.PathLike
        The index file.

    Returns
    -------
    dict[str, str]
        Tensor name to shard file name (in the index's directory).

    Raises
    ------
    LoraFormatError
        If the file is missing, not UTF-8 JSON, has no ``weight_map`` object,
        or maps a tensor to something that is not a plain file name in the
        index's directory; the message names the file and the tensor.
    """
    path = as_path(path)
    if not path.is_file():
        raise LoraFormatError(f"{path} does not exist (expected a safetensors index file)")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise LoraFormatError(f"{path} is not UTF-8 text: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise LoraFormatError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("weight_map"), dict):
        raise LoraFormatError(f"{path} must hold a JSON object with a 'weight_map' object")
    weight_map = raw["weight_map"]
    if not weight_map:
        raise LoraFormatError(f"{path}: 'weight_map' is empty")
    for key, shard in weight_map.items():
        if not _plain_name(shard):
            raise LoraFormatError(f"{path}: tensor {key!r} maps to {shard!r}, which is not a "
                                  "plain file name in the index's directory")
    return dict(weight_map)


class ShardedSafetensors:
    """A sharded safetensors checkpoint, through its index; read like one :class:`SafetensorsFile`.

    Only the index is read here.  A shard's header is read the first time
    one of its tensors is asked for, and each tensor is read on its own
    (a seek and a read), so loading an adapter touches only the shards and
    bytes of the weights it adapts.

    Parameters
    ----------
    index : str or os.PathLike
        The index file (``model.safetensors.index.json``); shard names are
        relative to its directory.

    Raises
    ------
    LoraFormatError
        For a malformed index (see :func:`read_index`); later, from the
        methods, for a missing or malformed shard, or a shard that does not
        hold a tensor the index places in it.  Messages name the file and
        the tensor.
    """

    def __init__(self, index: str | os.PathLike[str]) -> None:
        self.path = as_path(index)
        self._weight_map = read_index(self.path)
        self._shards = {}

    def _shard(self, key):
        name = self._weight_map[key]
        shard = self._shards.get(name)
        if shard is None:
            shard_path = self.path.parent / name
            if not shard_path.is_file():
                raise LoraFormatError(f"{self.path} places tensor {key!r} in shard {name!r}, "
                                      f"which does not exist ({shard_path})")
            shard = self._shards[name] = SafetensorsFile(shard_path)
        if key not in shard:
            raise LoraFormatError(f"{self.path} places tensor {key!r} in {shard.path}, which "
                                  "does not hold it")
        return shard

    def keys(self) -> list[str]:
        """The tensor names, in the index's order.

        Returns
        -------
        list of str
            A new list.
        """
        return list(self._weight_map)

    def __contains__(self, key):
        return key in self._weight_map

    def __len__(self):
        return len(self._weight_map)

    def file_of(self, key: str) -> Path:
        """The path of the shard the index places tensor ``key`` in.

        Parameters
        ----------
        key : str
            A tensor name the index holds.

        Returns
        -------
        pathlib.Path
            The shard's path, in the index's directory.
        """
        return self.path.parent / self._weight_map[key]

    def dtype(self, key: str) -> str:
        """The tensor's safetensors dtype name, from its shard's header.

        Parameters
        ----------
        key : str
            A tensor name the index holds.

        Returns
        -------
        str
            The dtype name (``"F32"``, ``"BF16"``, ...).
        """
        return self._shard(key).dtype(key)

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape, from its shard's header.

        Parameters
        ----------
        key : str
            A tensor name the index holds.

        Returns
        -------
        tuple of int
            The shape.
        """
        return self._shard(key).shape(key)

    def read(self, key: str) -> np.ndarray:
        """Tensor ``key``, read from its shard alone; see :meth:`SafetensorsFile.read`.

        Parameters
        ----------
        key : str
            A tensor name the index holds.

        Returns
        -------
        ndarray
            A new array of the tensor's shape.
        """
        return self._shard(key).read(key)

    def read_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        """``{key: array}`` for ``keys``, each shard opened once.

        Parameters
        ----------
        keys : iterable of str
            Tensor names the index holds.

        Returns
        -------
        dict[str, ndarray]
            New arrays, in the order of ``keys``.
        """
        by_shard = {}
        for key in keys:
            by_shard.setdefault(self._weight_map[key], []).append(key)
        result = {}
        for names in by_shard.values():
            shard = self._shard(names[0])
            for key in names[1:]:
                self._shard(key)  # checks the shard holds it
            result.update(shard.read_many(names))
        return {key: result[key] for key in keys}


def open_weights(path: str | os.PathLike[str]) -> SafetensorsFile | ShardedSafetensors:
    """The weights at ``path``, lazily: a :class:`SafetensorsFile` or a :class:`ShardedSafetensors`.

    ``path`` is a ``.safetensors`` file, a ``*.safetensors.index.json``
    index of a sharded checkpoint, or a directory holding one of them (a
    Hugging Face model directory: ``model.safetensors``, or
    ``model.safetensors.index.json`` with its ``model-0000k-of-0000n``
    shards).

    Parameters
    ----------
    path : str or os.PathLike
        A file, an index file or a model directory.

    Returns
    -------
    SafetensorsFile or ShardedSafetensors
        Headers read and checked; tensors are read on request.

    Raises
    ------
    LoraFormatError
        If a directory holds no safetensors weights, or more than one set of
        them (two index files, or several ``.safetensors`` files and no
        index); or the file is malformed.
    """
    path = as_path(path)
    if path.is_dir():
        names = sorted(entry.name for entry in os.scandir(path))
        indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
        if len(indexes) > 1:
            raise LoraFormatError(f"{path} holds {len(indexes)} safetensors index files "
                                  f"({', '.join(indexes)}); pass the one to use")
        if indexes:
            return ShardedSafetensors(path / indexes[0])
        singles = [n for n in names if n.endswith(".safetensors")]
        if len(singles) != 1:
            raise LoraFormatError(
                f"{path} holds no safetensors weights (no *{INDEX_SUFFIX}, no .safetensors file)"
                if not singles else
                f"{path} holds {len(singles)} .safetensors files ({', '.join(singles[:4])}"
                f"{', ...' if len(singles) > 4 else ''}) and no index naming them as shards")
        return SafetensorsFile(path / singles[0])
    if path.name.endswith(INDEX_SUFFIX):
        return ShardedSafetensors(path)
    return SafetensorsFile(path)
