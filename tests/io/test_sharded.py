"""Base weights from a sharded Hugging Face checkpoint: an index and its shards, read lazily."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from numba_lora import LoraAdapter, LoraConfig, LoraFormatError
from numba_lora.io.safetensors import SafetensorsFile, ShardedSafetensors, open_weights

INDEX = "model.safetensors.index.json"
MODULES = ["model.layers.0.q_proj", "model.layers.1.q_proj"]


def write_checkpoint(directory, rng, index=None):
    """Two shards, as transformers' save_pretrained writes them, and their index."""
    directory.mkdir(parents=True, exist_ok=True)
    shards = {
        "model-00001-of-00003.safetensors": {
            "model.embed_tokens.weight": rng.standard_normal((10, 6)).astype(np.float32),
            "model.layers.0.q_proj.weight": rng.standard_normal((5, 6)).astype(np.float32),
        },
        "model-00002-of-00003.safetensors": {
            "model.layers.1.q_proj.weight": rng.standard_normal((5, 6)).astype(np.float32),
        },
        "model-00003-of-00003.safetensors": {
            "lm_head.weight": rng.standard_normal((10, 6)).astype(np.float32),
        },
    }
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    raw = {"metadata": {"total_size": 0}, "weight_map": weight_map} if index is None else index
    (directory / INDEX).write_text(json.dumps(raw))
    return {k: v for tensors in shards.values() for k, v in tensors.items()}


def write_adapter(directory, base, rng):
    adapter = LoraAdapter(LoraConfig(r=2, lora_alpha=4))
    for name in MODULES:
        adapter.add_layer(name, base[f"{name}.weight"], seed=0).lora_b = \
            rng.standard_normal((5, 2))
    adapter.save_peft(directory)
    return adapter


@pytest.mark.parametrize("where", ["directory", "index"])
def test_loads_onto_a_sharded_checkpoint(tmp_path, rng, where):
    base = write_checkpoint(tmp_path / "base", rng)
    original = write_adapter(tmp_path / "adapter", base, rng)
    path = tmp_path / "base" if where == "directory" else tmp_path / "base" / INDEX
    adapter = LoraAdapter.from_peft(tmp_path / "adapter", path)
    assert adapter.layer_names == MODULES
    X = rng.standard_normal((3, 6)).astype(np.float32)
    for name in MODULES:
        np.testing.assert_array_equal(adapter[name].weight, base[f"{name}.weight"])
        np.testing.assert_array_equal(adapter.forward_batch_layer(name, X),
                                      original.forward_batch_layer(name, X))


def test_reads_only_the_tensors_and_shards_the_adapter_needs(tmp_path, rng, monkeypatch):
    base = write_checkpoint(tmp_path / "base", rng)
    write_adapter(tmp_path / "adapter", base, rng)
    # A shard the adapter does not need may even be missing (a partial download).
    (tmp_path / "base" / "model-00003-of-00003.safetensors").unlink()
    opened, read = [], []
    real_init, real_read_many = SafetensorsFile.__init__, SafetensorsFile.read_many
    monkeypatch.setattr(SafetensorsFile, "__init__",
                        lambda self, path: (opened.append(path.name), real_init(self, path))[1])
    monkeypatch.setattr(SafetensorsFile, "read_many",
                        lambda self, keys: (read.extend(keys), real_read_many(self, keys))[1])
    LoraAdapter.from_peft(tmp_path / "adapter", tmp_path / "base")
    base_reads = [k for k in read if not k.startswith("base_model.model.")]
    assert base_reads == [f"{name}.weight" for name in MODULES]
    assert sorted(n for n in opened if n.startswith("model-")) == [
        "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"]


def test_sharded_reader_reads_like_one_file(tmp_path, rng):
    base = write_checkpoint(tmp_path, rng)
    checkpoint = open_weights(tmp_path)
    assert isinstance(checkpoint, ShardedSafetensors) and len(checkpoint) == len(base)
    assert checkpoint.keys() == list(base) and "lm_head.weight" in checkpoint
    assert checkpoint.shape("lm_head.weight") == (10, 6) and checkpoint.dtype("lm_head.weight") == "F32"
    assert checkpoint.file_of("lm_head.weight").name == "model-00003-of-00003.safetensors"
    got = checkpoint.read_many(["lm_head.weight", "model.embed_tokens.weight"])
    assert list(got) == ["lm_head.weight", "model.embed_tokens.weight"]
    for key, value in got.items():
        np.testing.assert_array_equal(value, base[key])


def test_a_directory_with_one_file_is_that_file(tmp_path, rng):
    save_file({"w": np.ones((2, 2), np.float32)}, str(tmp_path / "model.safetensors"))
    assert isinstance(open_weights(tmp_path), SafetensorsFile)


def index_with(**changes):
    weight_map = {"model.layers.0.q_proj.weight": "model-00001-of-00003.safetensors",
                  "model.layers.1.q_proj.weight": "model-00002-of-00003.safetensors"}
    weight_map.update(changes)
    return {"weight_map": weight_map}


@pytest.mark.parametrize("index, match", [
    (index_with(**{"model.layers.1.q_proj.weight": "model-00009-of-00009.safetensors"}),
     r"INDEX places tensor 'model.layers.1.q_proj.weight' in shard "
     r"'model-00009-of-00009.safetensors', which does not exist"),
    (index_with(**{"model.layers.1.q_proj.weight": "model-00001-of-00003.safetensors"}),
     r"INDEX places tensor 'model.layers.1.q_proj.weight' in .*model-00001-of-00003.safetensors, "
     r"which does not hold it"),
    (index_with(**{"model.layers.1.q_proj.weight": "../model-00002-of-00003.safetensors"}),
     r"INDEX: tensor 'model.layers.1.q_proj.weight' maps to '../model-00002-of-00003.safetensors', "
     r"which is not a plain file name"),
    (index_with(**{"model.layers.1.q_proj.weight": 2}), r"maps to 2, which is not a plain file name"),
    ({"metadata": {}}, r"INDEX must hold a JSON object with a 'weight_map' object"),
    ({"weight_map": {}}, r"INDEX: 'weight_map' is empty"),
    ([1, 2], r"INDEX must hold a JSON object"),
])
def test_broken_indexes_name_the_file_and_the_key(tmp_path, rng, index, match):
    base = write_checkpoint(tmp_path / "base", rng, index=index)
    write_adapter(tmp_path / "adapter", base, rng)
    with pytest.raises(LoraFormatError, match=match.replace("INDEX", f"{INDEX}")):
        LoraAdapter.from_peft(tmp_path / "adapter", tmp_path / "base")


@pytest.mark.parametrize("text, match", [
    ("{", "is not valid JSON"),
    (b"\xff\xfe{}", "is not UTF-8 text"),
])
def test_an_index_that_is_not_json(tmp_path, rng, text, match):
    base = write_checkpoint(tmp_path / "base", rng)
    write_adapter(tmp_path / "adapter", base, rng)
    index = tmp_path / "base" / INDEX
    index.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(LoraFormatError, match=rf"{INDEX} {match}"):
        LoraAdapter.from_peft(tmp_path / "adapter", index)


def test_a_broken_shard_names_the_shard(tmp_path, rng):
    base = write_checkpoint(tmp_path / "base", rng)
    write_adapter(tmp_path / "adapter", base, rng)
    (tmp_path / "base" / "model-00002-of-00003.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(LoraFormatError, match=r"model-00002-of-00003.safetensors is 3 bytes long"):
        LoraAdapter.from_peft(tmp_path / "adapter", tmp_path / "base")


def test_ambiguous_directories_are_refused(tmp_path, rng):
    write_checkpoint(tmp_path, rng)
    (tmp_path / "other.safetensors.index.json").write_text("{}")
    with pytest.raises(LoraFormatError, match="holds 2 safetensors index files"):
        open_weights(tmp_path)
    (tmp_path / "other.safetensors.index.json").unlink()
    (tmp_path / INDEX).unlink()
    with pytest.raises(LoraFormatError, match=r"holds 3 .safetensors files .* and no index"):
        open_weights(tmp_path)
    with pytest.raises(LoraFormatError, match="does not exist"):
        open_weights(tmp_path / INDEX)
