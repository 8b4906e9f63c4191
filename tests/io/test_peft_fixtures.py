"""numba_lora against outputs made by real PEFT (tests/fixtures/make_peft_fixtures.py).

The always-run tests read the committed fixtures; the round trip through
PEFT itself runs only where torch and peft are installed.
"""

from pathlib import Path

import numpy as np
import pytest

from numba_lora import LoraAdapter
from numba_lora.io.safetensors import read_safetensors

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BASE = FIXTURES / "base_model.safetensors"
ADAPTERS = ["peft_lora", "peft_rslora"]
RTOL = 1e-6  # float32, relative to the largest output of the module


def outputs(name):
    raw = read_safetensors(FIXTURES / name / "outputs.safetensors")
    modules = sorted(k[len("input."):] for k in raw if k.startswith("input."))
    return modules, raw


def assert_rel_close(actual, expected):
    scale = np.abs(expected).max()
    err = np.abs(actual.astype(np.float64) - expected).max() / scale
    assert err <= RTOL, f"relative error {err:.2e} > {RTOL:.0e}"


@pytest.mark.parametrize("name", ADAPTERS)
def test_forward_matches_peft(name):
    adapter = LoraAdapter.from_peft(FIXTURES / name, BASE)
    modules, raw = outputs(name)
    assert sorted(adapter.layer_names) == modules
    for module in modules:
        X = raw[f"input.{module}"]
        assert_rel_close(adapter.forward_batch_layer(module, X), raw[f"output.{module}"])
        assert_rel_close(adapter.forward_layer(module, X[0]), raw[f"output.{module}"][0])


@pytest.mark.parametrize("name", ADAPTERS)
def test_merge_all_matches_peft(name):
    adapter = LoraAdapter.from_peft(FIXTURES / name, BASE)
    adapter.merge_all()
    modules, raw = outputs(name)
    for module in modules:
        assert_rel_close(adapter[module].weight, raw[f"merged_weight.{module}"])
        assert_rel_close(adapter.forward_batch_layer(module, raw[f"input.{module}"]),
                         raw[f"merged_output.{module}"])


def test_patterns_and_rslora_were_honoured():
    plain = LoraAdapter.from_peft(FIXTURES / "peft_lora", BASE)
    assert plain["mlp.fc"].rank == 2  # rank_pattern {"fc": 2}
    assert plain["layers.1.q_proj"].alpha == 5  # alpha_pattern
    assert plain["layers.0.q_proj"].scaling == 8 / 4
    rs = LoraAdapter.from_peft(FIXTURES / "peft_rslora", BASE)
    assert rs["layers.0.q_proj"].scaling == pytest.approx(16 / np.sqrt(8))


@pytest.mark.parametrize("name", ADAPTERS)
def test_peft_loads_what_numba_lora_saves(name, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import sys

    sys.path.insert(0, str(FIXTURES))
    from peft_toy import toy_with_base_weights

    adapter = LoraAdapter.from_peft(FIXTURES / name, BASE)
    adapter.save_peft(tmp_path)
    model = peft.PeftModel.from_pretrained(toy_with_base_weights(read_safetensors(BASE)), tmp_path)
    model.eval()
    modules, raw = outputs(name)
    with torch.no_grad():
        for module in modules:
            x = torch.from_numpy(raw[f"input.{module}"])
            theirs = model.base_model.model.get_submodule(module)(x).numpy()
            assert_rel_close(adapter.forward_batch_layer(module, raw[f"input.{module}"]), theirs)
