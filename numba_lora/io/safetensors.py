"""Reading safetensors files with the safetensors NumPy API (no torch)."""

import json

import numpy as np

from ..errors import LoraFormatError

__all__ = ["read_safetensors"]


def _bf16_to_f32(raw, shape):
    bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
    return bits.view(np.float32).reshape(shape)


def read_safetensors(path):
    """``{name: ndarray}`` from a safetensors file, with the safetensors NumPy API.

    bfloat16 tensors, which NumPy has no dtype for, are widened to float32
    exactly.
    """
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="np") as fh:
        for key in fh.keys():
            try:
                tensors[key] = fh.get_tensor(key)
            except (TypeError, ValueError):
                tensors[key] = None  # bfloat16: decoded from the raw bytes below
    if any(v is None for v in tensors.values()):
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
            base = 8 + header_len
            for key, value in tensors.items():
                if value is not None:
                    continue
                info = header[key]
                if info["dtype"] != "BF16":
                    raise LoraFormatError(f"tensor {key!r} has dtype {info['dtype']}, which cannot be read")
                start, stop = info["data_offsets"]
                fh.seek(base + start)
                tensors[key] = _bf16_to_f32(fh.read(stop - start), info["shape"])
    return tensors
