"""Shared by the checkpoint tests: an independent safetensors reader and writer, references."""

import json
import math
from pathlib import Path

import numpy as np

from numba_lora import kernels

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "peft_checkpoint"

#: NumPy dtype of each safetensors dtype's raw elements (bfloat16 as its bits).
RAW = {"F32": np.float32, "F64": np.float64, "F16": np.uint16, "BF16": np.uint16,
       "I32": np.int32, "I64": np.int64}
CODES = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.float16): "F16",
         np.dtype(np.int32): "I32", np.dtype(np.int64): "I64"}


def header(path):
    """(header dict, data start) of a safetensors file, parsed here, not by numba_lora."""
    data = Path(path).read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), 8 + n


def raw_tensors(path):
    """{name: (dtype, shape, bytes)} of a safetensors file."""
    data = Path(path).read_bytes()
    head, start = header(path)
    return {name: (info["dtype"], tuple(info["shape"]),
                   data[start + info["data_offsets"][0]:start + info["data_offsets"][1]])
            for name, info in head.items() if name != "__metadata__"}


def checkpoint_tensors(directory):
    """{name: (dtype, shape, bytes)} over every shard of a checkpoint directory."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    tensors = {}
    for shard in shards:
        tensors.update(raw_tensors(directory / shard))
    return tensors


def as_array(entry):
    dtype, shape, data = entry
    return np.frombuffer(data, RAW[dtype]).reshape(shape)


def write_safetensors(path, tensors, *, gap=0):
    """Write ``{name: array or (dtype code, array)}``; ``gap`` padding bytes between tensors."""
    header_, blobs, offset = {}, [], 0
    for name, value in tensors.items():
        code, array = value if isinstance(value, tuple) else (CODES[value.dtype], value)
        array = np.ascontiguousarray(array)
        data = array.astype(array.dtype.newbyteorder("<")).tobytes()
        header_[name] = {"dtype": code, "shape": list(array.shape),
                         "data_offsets": [offset, offset + len(data)]}
        blobs.append(data + b"\0" * gap)
        offset += len(data) + gap
    header_["__metadata__"] = {"format": "pt"}
    text = json.dumps(header_).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def write_checkpoint(directory, shards, *, index=True, extra_files=None):
    """A checkpoint of ``shards`` (a list of {name: tensor} dicts), indexed unless one shard."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not index:
        assert len(shards) == 1
        write_safetensors(directory / "model.safetensors", shards[0])
    else:
        weight_map, total = {}, 0
        for k, tensors in enumerate(shards, 1):
            name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(directory / name, tensors)
            for key, value in tensors.items():
                array = value[1] if isinstance(value, tuple) else value
                weight_map[key] = name
                total += array.nbytes
        (directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (directory / "config.json").write_text('{"model_type": "tiny"}\n')
    for name, text in (extra_files or {}).items():
        (directory / name).write_text(text)
    return directory


def write_adapter(directory, factors, **config):
    """A PEFT adapter directory: ``factors`` {module: (A, B)}, config entries over defaults."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (A, B) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = A
        tensors[f"base_model.model.{module}.lora_B.weight"] = B
    write_safetensors(directory / "adapter_model.safetensors", tensors)
    payload = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": sorted(factors)}
    payload.update(config)
    (directory / "adapter_config.json").write_text(json.dumps(payload))
    return directory


# ------------------------------------------------------------ references
def round_bf16_reference(x):
    """float32 -> bfloat16 bits, to nearest with ties to even, by comparing the two neighbours.

    Written independently of the kernels' carry trick: the neighbours below
    and above ``|x|`` in bfloat16 are found from the bits, their distances
    to ``x`` compared in float64 (exact), ties going to the even one; past
    the largest finite bfloat16 the upper neighbour is 2**128 (infinity).
    NaN: returned as the float32's top half with the quiet bit set.
    """
    x = np.asarray(x, np.float32).ravel()
    u = x.view(np.uint32)
    sign = (u >> 16) & 0x8000
    mag = u & 0x7FFFFFFF
    low = mag & 0xFFFF0000
    high = low + 0x10000
    with np.errstate(over="ignore", invalid="ignore"):  # NaN and infinity: set below
        value = np.abs(x.astype(np.float64))
        low_value = low.view(np.float32).astype(np.float64)
        high_value = np.where(high >= 0x7F800000, 2.0 ** 128,
                              high.astype(np.uint32).view(np.float32).astype(np.float64))
        down = value - low_value
        up = high_value - value
    even_low = ((low >> 16) & 1) == 0
    pick_low = (down < up) | ((down == up) & even_low)
    result = np.where(pick_low, low >> 16, np.minimum(high >> 16, 0x7F80)) | sign
    infinite = mag == 0x7F800000
    result = np.where(infinite, (u >> 16), result)
    nan = mag > 0x7F800000
    result = np.where(nan, (u >> 16) | 0x40, result)
    return result.astype(np.uint16)


def widen_bf16_reference(bits):
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def merged_half_reference(bits, A, B, scaling, fmt):
    """What merge_bf16 / merge_f16 must return: float32 merge (PEFT-verified), rounded once."""
    bits = np.asarray(bits, np.uint16)
    if fmt == "bf16":
        W = widen_bf16_reference(bits).reshape(bits.shape).copy()
    else:
        W = bits.view(np.float16).astype(np.float32)
    kernels.merge(W, np.ascontiguousarray(A, np.float32), np.ascontiguousarray(B, np.float32),
                  scaling)
    if fmt == "bf16":
        return round_bf16_reference(W).reshape(bits.shape)
    with np.errstate(over="ignore"):
        return W.astype(np.float16).view(np.uint16)


def tricky_float32_bits(rng, n_random=1 << 18):
    """float32 bit patterns around every rounding boundary of bfloat16 and float16, plus random ones."""
    patterns = [rng.integers(0, 2**32, n_random, dtype=np.uint64).astype(np.uint32)]
    exponents = np.arange(256, dtype=np.uint32) << 23
    for k in range(13, 25):  # dropped bits: 16 for bfloat16, 13.. for float16 (subnormals more)
        half = np.uint32(1 << (k - 1))
        upper = rng.integers(0, 2**23, exponents.size, dtype=np.uint64).astype(np.uint32)
        upper &= ~np.uint32((1 << k) - 1) & np.uint32(0x7FFFFF)
        for low in (0, half - 1, half, half + 1, (1 << k) - 1, half | (1 << k)):
            mant = (upper | np.uint32(low)) & np.uint32(0x7FFFFF)
            patterns.append(exponents | mant)
    special = np.array([0, 0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x7F800000, 0x7FC00000, 0x7F800001,
                        0x477FE000, 0x477FEFFF, 0x477FF000, 0x38800000, 0x387FFFFF, 0x33800000,
                        0x33000000, 0x33000001, 0x00000001, 0x007FFFFF], np.uint32)
    patterns.append(special)
    allbits = np.concatenate(patterns)
    return np.concatenate([allbits, allbits | np.uint32(0x80000000)])


def nbytes(shape, itemsize):
    return math.prod(shape) * itemsize
