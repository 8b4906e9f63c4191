"""The NumPy-only safetensors reader: what safetensors writes reads back; anything malformed
is a LoraFormatError naming the file (and the tensor), never safetensors' or NumPy's own error."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import save_file

from numba_lora import LoraFormatError, LoraTypeError
from numba_lora.io.safetensors import SafetensorsFile, read_safetensors


def raw_file(path, header, data=b"", header_len=None):
    """A safetensors file written by hand: header dict (or raw bytes) and data bytes."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(blob) if header_len is None else header_len
    path.write_bytes(length.to_bytes(8, "little") + blob + data)
    return path


def test_reads_what_safetensors_writes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f64": rng.standard_normal((3, 4)),
        "f32": rng.standard_normal((2, 5)).astype(np.float32),
        "f16": rng.standard_normal(7).astype(np.float16),
        "i64": np.arange(-3, 3, dtype=np.int64).reshape(2, 3),
        "u8": np.arange(5, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "empty": np.zeros((0, 3), np.float32),
        "scalar": np.array(2.5),
    }
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
    got = read_safetensors(tmp_path / "t.safetensors")
    assert sorted(got) == sorted(tensors)
    for key, value in tensors.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key], value)
        assert got[key].flags.writeable and got[key].dtype.isnative
    file = SafetensorsFile(str(tmp_path / "t.safetensors"))
    assert "f32" in file and len(file) == len(tensors) and file.shape("f64") == (3, 4)
    assert file.dtype("f16") == "F16"


def test_bfloat16_decodes_exactly(tmp_path):
    # bf16 is the top half of an f32: every special value must survive.
    bits = np.array([0x3FC0, 0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x0001, 0x7F7F, 0xC2F7],
                    "<u2")
    expected = (bits.astype(np.uint32) << 16).view(np.float32)
    path = raw_file(tmp_path / "bf16.safetensors",
                    {"x": {"dtype": "BF16", "shape": [3, 3], "data_offsets": [0, 18]}},
                    bits.tobytes())
    got = read_safetensors(path)["x"]
    assert got.dtype == np.float32 and got.shape == (3, 3)
    np.testing.assert_array_equal(got.ravel().view(np.uint32), expected.view(np.uint32))
    assert got.flat[0] == 1.5 and np.isinf(got.flat[3]) and np.isnan(got.flat[5])


GOOD = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
DATA = np.arange(4, dtype="<f4").tobytes()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p.write_bytes(bytes(np.random.default_rng(1).integers(0, 256, 200, np.uint8))),
         "header"),
        (lambda p: p.write_bytes(b"\x01\x02"), "too short for a safetensors header"),
        (lambda p: raw_file(p, GOOD, DATA, header_len=2**62), "declares a 4611686018427387904-byte header"),
        (lambda p: raw_file(p, b"{not json", b""), "not UTF-8 JSON"),
        (lambda p: raw_file(p, b"\xff\xfe{}", b""), "not UTF-8 JSON"),
        (lambda p: raw_file(p, b"[1, 2]", b""), "JSON list, not an object"),
        (lambda p: raw_file(p, b'{"w": 1, "w": 2}', b""), "names tensor 'w' twice"),
        (lambda p: raw_file(p, {"w": [1]}, b""), "tensor 'w': has a header entry that is a JSON list"),
        (lambda p: raw_file(p, {"w": {"dtype": 5, "shape": [1], "data_offsets": [0, 4]}}, DATA),
         "tensor 'w': has no dtype string"),
        (lambda p: raw_file(p, {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, DATA),
         "tensor 'w': has shape \\[-1\\]"),
        (lambda p: raw_file(p, {"w": {"dtype": "F32", "shape": "2x2", "data_offsets": [0, 16]}}, DATA),
         "tensor 'w': has shape '2x2'"),
        (lambda p: raw_file(p, {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 4]}}, DATA),
         "tensor 'w': has data_offsets \\[8, 4\\]"),
        (lambda p: raw_file(p, {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 160]}}, DATA),
         "tensor 'w': has data_offsets \\[0, 160\\], past the end .* truncated"),
        (lambda p: raw_file(p, GOOD, DATA[:10]), "tensor 'w': .* truncated"),
        (lambda p: raw_file(p, {"w": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 16]}}, DATA),
         "tensor 'w': has 16 bytes of data, but dtype F32 and shape \\(3, 3\\) need 36"),
        (lambda p: raw_file(p, {"w": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}},
                            DATA[:4]), "tensor 'w': has dtype F8_E4M3, which numba_lora cannot read"),
        (lambda p: raw_file(p, {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}},
                            DATA[:8]), "tensor 'w': has dtype C64"),
        (lambda p: raw_file(p, {"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 5]}},
                            DATA[:5]), "tensor 'w': has 5 bytes of data, but dtype BF16"),
        (lambda p: p.mkdir(), "is a directory, not a safetensors file"),
        (lambda p: None, "does not exist"),
    ],
)
def test_malformed_files_name_the_file(tmp_path, make, match):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(LoraFormatError, match=match) as info:
        read_safetensors(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_a_truncated_real_file(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": np.ones((4, 4), np.float32), "b": np.ones(8)}, str(path))
    blob = path.read_bytes()
    for cut in (len(blob) - 1, len(blob) - 40, 9, 4):
        path.write_bytes(blob[:cut])
        with pytest.raises(LoraFormatError, match=str(path)):
            read_safetensors(path)


F32x2 = {"dtype": "F32", "shape": [2]}
EMPTY = {"dtype": "F32", "shape": [0, 3]}


@pytest.mark.parametrize("header, data, match", [
    # The format: "the byte buffer needs to be entirely indexed, and cannot
    # contain holes"; the safetensors library refuses each of these too.
    ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [0, 8]}}, 8,
     "tensor '[ab]': has data_offsets \\[0, 8\\], which overlap tensor '[ab]'"),
    ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [4, 12]}}, 12,
     "tensor 'b': has data_offsets \\[4, 12\\], which overlap tensor 'a'"),
    ({"a": {**F32x2, "data_offsets": [0, 8]}, "z": {**EMPTY, "data_offsets": [4, 4]}}, 8,
     "tensor 'z': .* overlap tensor 'a'"),
    ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [16, 24]}}, 24,
     "tensor 'b': starts at byte 16 of the data, leaving a hole after byte 8"),
    ({"a": {**F32x2, "data_offsets": [4, 12]}}, 12, "tensor 'a': starts at byte 4 .* hole"),
    ({"a": {**F32x2, "data_offsets": [0, 8]}}, 12, "has 4 bytes after its last tensor"),
    ({}, 3, "has 3 bytes after its last tensor"),
])
def test_data_must_be_covered_exactly(tmp_path, header, data, match):
    path = raw_file(tmp_path / "bad.safetensors", header, bytes(data))
    with pytest.raises(LoraFormatError, match=match) as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value)
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    with pytest.raises(SafetensorError):
        load_file(str(path))


def test_empty_tensors_take_no_bytes_at_any_boundary(tmp_path):
    header = {"z0": {**EMPTY, "data_offsets": [0, 0]}, "a": {**F32x2, "data_offsets": [0, 8]},
              "z1": {**EMPTY, "data_offsets": [8, 8]}, "z2": {**EMPTY, "data_offsets": [8, 8]},
              "b": {**F32x2, "data_offsets": [8, 16]}}
    path = raw_file(tmp_path / "ok.safetensors", header, np.arange(4, dtype="<f4").tobytes())
    got = read_safetensors(path)
    np.testing.assert_array_equal(got["b"], [2, 3])
    assert got["z1"].shape == (0, 3)
    file = SafetensorsFile(path)
    assert file.data_offsets("b") == (8, 16) and file.size == path.stat().st_size
    assert file.data_start == path.stat().st_size - 16


@pytest.mark.parametrize("path", [5, None, ["a.safetensors"], b"a.safetensors"])
def test_path_must_be_a_path(path):
    with pytest.raises(LoraTypeError, match="path must be a str or os.PathLike") as info:
        read_safetensors(path)
    assert isinstance(info.value, TypeError)


def _valid_blob():
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.safetensors"
        save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float16)},
                  str(path), metadata={"format": "pt"})
        return path.read_bytes()


_BLOB = _valid_blob()


@given(edits=st.lists(st.tuples(st.integers(0, len(_BLOB) - 1), st.integers(0, 255)), max_size=4),
       cut=st.integers(0, len(_BLOB)))
def test_damaged_files_raise_only_lora_format_error(edits, cut):
    blob = bytearray(_BLOB)
    for position, value in edits:
        blob[position] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.safetensors"
        path.write_bytes(bytes(blob[:cut]))
        try:
            tensors = read_safetensors(path)
        except LoraFormatError as exc:
            assert str(path) in str(exc)
        else:
            assert all(isinstance(v, np.ndarray) for v in tensors.values())
