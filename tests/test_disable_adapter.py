"""``disable_adapter()``: PEFT's context manager, on LoraLinear and on LoraAdapter."""

import numpy as np
import pytest

from numba_lora import LoraAdapter, LoraConfig, LoraLinear


def make_layer(rng, dtype=np.float64):
    layer = LoraLinear(rng.standard_normal((6, 5)).astype(dtype), rank=2, alpha=4.0, seed=0)
    layer.lora_b = rng.standard_normal((6, 2))
    return layer


@pytest.mark.parametrize("merged", [False, True])
def test_layer_computes_the_base_inside_and_the_adapter_after(rng, merged):
    layer = make_layer(rng)
    base = np.array(layer.weight)
    x = rng.standard_normal(5)
    adapted = layer(x)
    if merged:
        layer.merge()
    with layer.disable_adapter() as inside:
        assert inside is layer and not layer.is_enabled
        np.testing.assert_allclose(layer(x), base @ x, rtol=1e-12, atol=1e-12)
    assert layer.is_enabled and layer.is_merged == merged
    np.testing.assert_allclose(layer(x), adapted, rtol=1e-12, atol=1e-12)


def test_layer_restores_the_state_it_had_even_after_an_exception(rng):
    layer = make_layer(rng)
    with pytest.raises(ZeroDivisionError):
        with layer.disable_adapter():
            1 / 0
    assert layer.is_enabled
    layer.disable()
    with layer.disable_adapter():
        layer.enable()  # changed inside the block: the state on entry comes back
    assert not layer.is_enabled


def test_adapter_disables_every_layer_and_restores_each(rng):
    adapter = LoraAdapter(LoraConfig(r=2, lora_alpha=4))
    for name in ("q", "v", "o"):
        adapter.add_layer(name, rng.standard_normal((6, 5)), seed=1).lora_b = \
            rng.standard_normal((6, 2))
    adapter["v"].disable()
    x = rng.standard_normal(5)
    with pytest.raises(KeyError):
        with adapter.disable_adapter() as inside:
            assert inside is adapter
            assert [layer.is_enabled for _, layer in adapter.items()] == [False] * 3
            np.testing.assert_allclose(adapter.forward_layer("q", x), adapter["q"].weight @ x,
                                       rtol=1e-12, atol=1e-12)
            adapter["o"].enable()
            raise KeyError("leaves the block")
    assert [adapter[n].is_enabled for n in ("q", "v", "o")] == [True, False, True]
