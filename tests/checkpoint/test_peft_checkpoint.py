"""checkpoint.merge against PEFT's merge_and_unload() on real sharded checkpoints, bit for bit.

The fixtures (tests/fixtures/peft_checkpoint, made by make_fixtures.py there
with torch 2.13, transformers and PEFT 0.21) are a tiny Llama-style model in
float32, bfloat16 and float16 and a tiny GPT-2 (Conv1D weights, so
fan_in_fan_out) in float32 and bfloat16, each saved sharded by
save_pretrained; PEFT adapters with non-zero B, rsLoRA, rank_pattern (ranks
1 to 200) and alpha_pattern; and every tensor's value after PEFT's merge.
The merged checkpoint must hold PEFT's values, tensor by tensor, and the
base's files, headers, layout and index, byte for byte.
"""

import json

import numpy as np
import pytest

from numba_lora import checkpoint, kernels

from .helpers import (FIXTURES, as_array, checkpoint_tensors, header, raw_tensors,
                      round_bf16_reference, widen_bf16_reference)

CASES = [("llama", "f32"), ("llama", "bf16"), ("llama", "f16"), ("gpt2", "f32"), ("gpt2", "bf16")]
ADAPTED = {"llama": 14, "gpt2": 8}


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    results = {}
    for model, tag in CASES:
        out = tmp_path_factory.mktemp(f"{model}_{tag}") / "merged"
        results[model, tag] = checkpoint.merge(FIXTURES / f"{model}_{tag}",
                                               FIXTURES / f"{model}_adapter", out)
    return results


def test_fixtures_are_there():
    for model, tag in CASES:
        assert (FIXTURES / f"{model}_{tag}" / "model.safetensors.index.json").is_file()
        assert (FIXTURES / f"{model}_{tag}_merged.safetensors").is_file()
    config = json.loads((FIXTURES / "llama_adapter" / "adapter_config.json").read_text())
    assert config["use_rslora"] and config["rank_pattern"] and config["alpha_pattern"]
    assert json.loads((FIXTURES / "gpt2_adapter" / "adapter_config.json").read_text())[
        "fan_in_fan_out"]


@pytest.mark.parametrize("model,tag", CASES)
def test_values_are_peft_merge_and_unload_bit_for_bit(merged, model, tag):
    result = merged[model, tag]
    peft = raw_tensors(FIXTURES / f"{model}_{tag}_merged.safetensors")
    ours = checkpoint_tensors(result.out)
    assert sorted(ours) == sorted(peft)
    for name, (dtype, shape, data) in peft.items():
        assert ours[name][:2] == (dtype, shape), name
        if ours[name][2] != data:
            differ = int((as_array(ours[name]) != as_array(peft[name])).sum())
            pytest.fail(f"{model} {tag}: tensor {name!r}: {differ} elements differ from PEFT's")


@pytest.mark.parametrize("model,tag", CASES)
def test_layout_index_and_other_files_are_the_base_s(merged, model, tag):
    base = FIXTURES / f"{model}_{tag}"
    result = merged[model, tag]
    out = result.out
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base.iterdir())
    index = "model.safetensors.index.json"
    assert (out / index).read_bytes() == (base / index).read_bytes()
    for name in ("config.json", "generation_config.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    assert set(result.shards) == set(json.loads((base / index).read_text())["weight_map"].values())
    for shard in result.shards:
        (_, start), (_, base_start) = header(out / shard), header(base / shard)
        assert (out / shard).read_bytes()[:start] == (base / shard).read_bytes()[:base_start]
        assert (out / shard).stat().st_size == (base / shard).stat().st_size
        ours, theirs = raw_tensors(out / shard), raw_tensors(base / shard)
        for name in theirs:
            if name not in result.merged:
                assert ours[name] == theirs[name], f"{shard}: {name} changed"
    assert len(result.merged) == ADAPTED[model]
    assert result.bytes == sum((base / s).stat().st_size for s in result.shards)
    assert not result.skipped


@pytest.mark.parametrize("model,tag", CASES)
def test_every_adapted_tensor_changed(merged, model, tag):
    result = merged[model, tag]
    base = checkpoint_tensors(FIXTURES / f"{model}_{tag}")
    ours = checkpoint_tensors(result.out)
    for name in result.merged:
        assert ours[name] != base[name], name
    assert all(("proj" in n or "c_attn" in n or "c_fc" in n) and n.endswith(".weight")
               for n in result.merged)


def test_bf16_fixture_tells_the_merge_orders_apart():
    # PEFT's safe_merge (and unmerge) round the delta to bfloat16 before
    # adding it: that must give other bits somewhere, or the bf16 test above
    # could not tell the default merge from it.
    plan = checkpoint.plan_merge(FIXTURES / "llama_bf16", FIXTURES / "llama_adapter")
    peft = raw_tensors(FIXTURES / "llama_bf16_merged.safetensors")
    base = checkpoint_tensors(FIXTURES / "llama_bf16")
    factors = raw_tensors(FIXTURES / "llama_adapter" / "adapter_model.safetensors")
    differ = 0
    for m in plan.merges:
        W = widen_bf16_reference(as_array(base[m.tensor])).reshape(base[m.tensor][1])
        A, B = as_array(factors[m.a_key]).copy(), as_array(factors[m.b_key]).copy()
        delta = np.zeros(W.shape, np.float32)
        kernels.merge(delta, A, B, m.scaling)
        rounded_delta = widen_bf16_reference(round_bf16_reference(delta)).reshape(W.shape)
        safe = round_bf16_reference(W + rounded_delta).reshape(W.shape)
        differ += int((safe != as_array(peft[m.tensor])).sum())
    assert differ > 0
