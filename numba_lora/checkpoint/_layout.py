"""The layout of a Hugging Face checkpoint directory: shards, index, tensors' byte ranges, other files.

Only headers are read here.  Everything a merge relies on is checked up
front, so that a problem is reported, naming the file and the tensor,
before any output exists: the index and the shards agree on every tensor,
shard names are plain file names inside the directory, tensors' byte ranges
cover the data exactly (no overlap, no hole, no trailing bytes).
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LoraFormatError
from ..io.safetensors import SafetensorsFile, as_path, read_index

__all__ = ["Checkpoint", "Shard", "TensorInfo", "read_checkpoint", "FLOAT_DTYPES"]

#: Stored dtypes a merge can write back: itemsize by safetensors name.
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}

# Files that hold weights in another format (or point at them): a merged
# checkpoint must not carry them over unmerged.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack",
                    ".gguf", ".onnx", ".index.json", ".npz", ".npy")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a shard: dtype name, shape, and byte range relative to the data start."""

    name: str
    dtype: str
    shape: tuple
    start: int
    stop: int


@dataclass(frozen=True)
class Shard:
    """One safetensors file: its name in the directory, sizes, and tensors in file order."""

    name: str
    size: int
    data_start: int
    tensors: tuple  # of TensorInfo, by start offset

    def tensor(self, name: str) -> TensorInfo:
        for info in self.tensors:
            if info.name == name:
                return info
        raise KeyError(name)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory: its shards, the index file (or None), and the other files."""

    directory: Path
    index: str
    shards: tuple  # of Shard, in the index's order of first appearance
    other_files: tuple  # names copied as they are
    skipped: tuple  # (name, why) of entries not copied
    where: dict = field(repr=False)  # tensor name -> shard name

    @property
    def total_bytes(self) -> int:
        """Bytes of all shards."""
        return sum(shard.size for shard in self.shards)


def _find_files(directory):
    """(index name or None, [shard names]) of the checkpoint in ``directory``."""
    names = sorted(entry.name for entry in os.scandir(directory))
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    if len(indexes) > 1:
        raise LoraFormatError(
            f"{directory} holds {len(indexes)} safetensors index files "
            f"({', '.join(indexes)}); merge one checkpoint per directory")
    if indexes:
        return indexes[0], None
    singles = [n for n in names if n.endswith(".safetensors")]
    if not singles:
        raise LoraFormatError(
            f"{directory} holds no safetensors checkpoint (no *.safetensors.index.json, "
            "no *.safetensors file)")
    if len(singles) > 1:
        raise LoraFormatError(
            f"{directory} holds {len(singles)} .safetensors files ({', '.join(singles[:4])}"
            f"{', ...' if len(singles) > 4 else ''}) and no index naming the shards")
    return None, singles


def _read_shard(directory, name):
    # SafetensorsFile checks the header (JSON, dtypes, shapes, sizes) and
    # that the tensors cover the data exactly: no overlap, no hole, nothing
    # after the last one, as the format (and the safetensors library) wants.
    file = SafetensorsFile(directory / name)
    tensors = [TensorInfo(key, file.dtype(key), tuple(file.shape(key)), *file.data_offsets(key))
               for key in file.keys()]
    tensors.sort(key=lambda t: (t.start, t.stop))
    return Shard(name, file.size, file.data_start, tuple(tensors))


def read_checkpoint(base: str | os.PathLike[str]) -> Checkpoint:
    """Read and check the layout of the checkpoint in directory ``base``.

    Raises
    ------
    LoraFormatError
        If ``base`` is not a directory holding one safetensors checkpoint, or
        the checkpoint is malformed (message names the file and the tensor).
    """
    directory = as_path(base, "base")
    if not directory.is_dir():
        raise LoraFormatError(f"base checkpoint {directory} is not a directory")
    index, singles = _find_files(directory)
    if index is not None:
        index_path = directory / index
        weight_map = read_index(index_path)
        order = list(dict.fromkeys(weight_map.values()))
    else:
        weight_map = None
        order = singles
    shards, where = [], {}
    for name in order:
        if not (directory / name).is_file():
            raise LoraFormatError(f"{directory / index}: shard {name!r} does not exist")
        shard = _read_shard(directory, name)
        for info in shard.tensors:
            if info.name in where:
                raise LoraFormatError(
                    f"tensor {info.name!r} is in both {where[info.name]} and {name}")
            where[info.name] = name
            if weight_map is not None and weight_map.get(info.name) != name:
                listed = weight_map.get(info.name)
                raise LoraFormatError(
                    f"{directory / name} holds tensor {info.name!r}, but {index} "
                    + ("does not list it" if listed is None else f"places it in {listed}"))
        shards.append(shard)
    if weight_map is not None:
        for key, name in weight_map.items():
            if where.get(key) != name:
                raise LoraFormatError(
                    f"{directory / index} places tensor {key!r} in {name}, which does not hold it")
    used = set(order) | ({index} if index else set())
    other, skipped = [], []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name in used:
            continue
        if not entry.is_file():  # follows symlinks (a hub cache's snapshot is all links)
            skipped.append((entry.name, "not a regular file"))
        elif entry.name.endswith(_WEIGHT_SUFFIXES):
            skipped.append((entry.name, "weights outside the merged checkpoint"))
        else:
            other.append(entry.name)
    return Checkpoint(directory, index, tuple(shards), tuple(other), tuple(skipped), where)
