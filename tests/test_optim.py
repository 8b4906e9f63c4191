"""numba_lora.optim: AdamW and SGD over layers and adapters, state dicts, gradient clipping."""

import math

import numpy as np
import pytest

import reference as ref
from numba_lora import (
    LoraAdapter,
    LoraConfig,
    LoraConfigError,
    LoraLinear,
    LoraNonFiniteError,
    LoraShapeError,
    LoraStateError,
    LoraTypeError,
)
from numba_lora.kernels import train as K
from numba_lora.optim import SGD, AdamW, clip_grad_norm


def make_layer(rng, dtype=np.float64, out_f=6, in_f=5, rank=2):
    layer = LoraLinear(rng.standard_normal((out_f, in_f)).astype(dtype), rank=rank, alpha=4.0,
                       seed=2)
    layer.lora_b = rng.standard_normal((out_f, rank))
    return layer


def backprop(layer, rng, batch=4):
    X = rng.standard_normal((batch, layer.in_features)).astype(layer.dtype)
    dY = rng.standard_normal((batch, layer.out_features)).astype(layer.dtype)
    _, ctx = layer.forward_train(X)
    layer.backward(dY, ctx, input_grad=False)


def snapshot(*layers):
    return [(layer.lora_a.copy(), layer.lora_b.copy()) for layer in layers]


def assert_same(layers, snaps):
    for layer, (a, b) in zip(layers, snaps):
        ref.assert_bitwise_equal(layer.lora_a, a)
        ref.assert_bitwise_equal(layer.lora_b, b)


def test_adamw_step_is_the_kernel_per_tensor_with_lora_plus(rng, dtype):
    layer = make_layer(rng, dtype)
    opt = AdamW(layer, lr=1e-2, weight_decay=0.1, lr_b_ratio=16.0)
    A, B = layer.lora_a.copy(), layer.lora_b.copy()
    mA, vA, mB, vB = (np.zeros_like(x) for x in (A, A, B, B))
    for step in (1, 2, 3):
        backprop(layer, rng)
        gA, gB = layer.grad_a.copy(), layer.grad_b.copy()
        opt.step()
        opt.zero_grad()
        K.adamw_step(A, gA, mA, vA, step, 1e-2, 0.9, 0.999, 1e-8, 0.1)
        K.adamw_step(B, gB, mB, vB, step, 1e-2 * 16.0, 0.9, 0.999, 1e-8, 0.1)
        ref.assert_bitwise_equal(layer.lora_a, A)
        ref.assert_bitwise_equal(layer.lora_b, B)
    assert opt.state[0]["step"] == 3 and opt.state[1]["step"] == 3
    ref.assert_bitwise_equal(opt.state[1]["exp_avg_sq"], vB)
    # A was updated in place, inside the stacked [W; A] buffer.
    assert np.shares_memory(layer._A, layer._WA)


def test_param_groups_adapters_and_skipped_layers(rng):
    adapter = LoraAdapter(LoraConfig(r=2, lora_alpha=4))
    fc1 = adapter.add_layer("fc1", rng.standard_normal((6, 5)), seed=0)
    fc2 = adapter.add_layer("fc2", rng.standard_normal((3, 6)), seed=1)
    extra = make_layer(rng)
    opt = AdamW([{"params": adapter, "lr": 1e-2}, {"params": [extra], "weight_decay": 0.0}],
                lr=1e-3)
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-3]
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-2, 0.0]
    backprop(fc1, rng)
    backprop(extra, rng)
    before = snapshot(fc2)
    opt.step()
    assert_same([fc2], before)  # no gradient: skipped, like torch's grad None
    assert sorted(opt.state) == [0, 1, 4, 5]
    sd = opt.state_dict()
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1, 2, 3], [4, 5]]
    opt.zero_grad()
    assert fc1.grad_a is None and extra.grad_b is None
    assert "AdamW(2 groups, 3 layers)" == repr(opt)


@pytest.mark.parametrize("make", [
    lambda layer: AdamW([layer, layer]),
    lambda layer: AdamW([]),
    lambda layer: AdamW([{"params": layer, "momentum": 0.9}]),
    lambda layer: AdamW([{"lr": 1.0}]),
    lambda layer: AdamW(layer, lr=np.nan),
    lambda layer: AdamW(layer, lr=-1.0),
    lambda layer: AdamW(layer, betas=(1.0, 0.9)),
    lambda layer: AdamW(layer, betas=0.9),
    lambda layer: AdamW(layer, eps=np.inf),
    lambda layer: AdamW(layer, weight_decay="0.1"),
    lambda layer: SGD(layer, nesterov=True),
    lambda layer: SGD(layer, momentum=0.9, nesterov=1),
])
def test_bad_configurations_are_refused(rng, make):
    with pytest.raises(LoraConfigError):
        make(make_layer(rng))


@pytest.mark.parametrize("params", ["fc", 3, [np.ones((2, 2))], {"params": None}])
def test_wrong_params_are_type_errors(params):
    with pytest.raises((LoraTypeError, LoraConfigError)):
        AdamW(params)


def test_a_refused_step_touches_nothing(rng):
    a, b = make_layer(rng), make_layer(rng)
    opt = AdamW([a, b], lr=1e-2)
    backprop(a, rng)
    backprop(b, rng)
    opt.step()
    backprop(a, rng)
    backprop(b, rng)
    state = opt.state_dict()
    before = snapshot(a, b)
    opt.param_groups[0]["lr"] = float("nan")
    with pytest.raises(LoraConfigError, match="lr"):
        opt.step()
    opt.param_groups[0]["lr"] = 1e-2
    b.merge()
    with pytest.raises(LoraStateError, match="merged"):
        opt.step()
    b.unmerge()
    assert_same([a], before[:1])
    after = opt.state_dict()
    for k in state["state"]:
        assert after["state"][k]["step"] == state["state"][k]["step"]
        ref.assert_bitwise_equal(after["state"][k]["exp_avg"], state["state"][k]["exp_avg"])


def test_a_step_makes_earlier_contexts_stale(rng):
    layer = make_layer(rng)
    opt = SGD(layer, lr=0.1)
    X = rng.standard_normal((2, 5))
    _, ctx = layer.forward_train(X)
    layer.backward(np.ones((2, 6)), ctx)
    opt.step()
    with pytest.raises(LoraStateError, match="changed"):
        layer.backward(np.ones((2, 6)), ctx)


@pytest.mark.parametrize("cls,kw", [(AdamW, dict(lr=1e-2, lr_b_ratio=4.0)),
                                    (SGD, dict(lr=0.05, momentum=0.9, nesterov=True))])
def test_resume_from_state_dict_gives_the_same_bits(rng, dtype, cls, kw):
    layer = make_layer(rng, dtype)
    resumed = layer.copy()
    data = [(rng.standard_normal((4, 5)).astype(dtype), rng.standard_normal((4, 6)).astype(dtype))
            for _ in range(6)]

    def train(layer, opt, batches):
        for X, dY in batches:
            _, ctx = layer.forward_train(X)
            layer.backward(dY, ctx, input_grad=False)
            opt.step()
            opt.zero_grad()

    train(layer, cls(layer, **kw), data)
    first = cls(resumed, **kw)
    train(resumed, first, data[:3])
    saved = first.state_dict()
    for entry in saved["state"].values():  # a copy: changing it changes nothing
        for value in entry.values():
            if isinstance(value, np.ndarray):
                value += 1
    saved = first.state_dict()
    second = cls(resumed, lr=123.0)
    second.load_state_dict(saved)
    assert second.param_groups[0]["lr"] == kw["lr"]
    train(resumed, second, data[3:])
    ref.assert_bitwise_equal(resumed.lora_a, layer.lora_a)
    ref.assert_bitwise_equal(resumed.lora_b, layer.lora_b)


def test_bad_state_dicts_are_refused_and_change_nothing(rng):
    layer = make_layer(rng)
    opt = AdamW(layer)
    backprop(layer, rng)
    opt.step()
    good = opt.state_dict()
    bad_cases = []
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = np.zeros((3, 3))
    bad_cases.append((sd, LoraShapeError))
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].astype(np.float32)
    bad_cases.append((sd, LoraShapeError))
    sd = opt.state_dict()
    sd["state"][7] = sd["state"][0]
    bad_cases.append((sd, LoraConfigError))
    sd = opt.state_dict()
    sd["param_groups"][0]["params"] = [0]
    bad_cases.append((sd, LoraConfigError))
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = np.nan
    bad_cases.append((sd, LoraConfigError))
    sd = opt.state_dict()
    sd["state"][0]["step"] = -1
    bad_cases.append((sd, LoraConfigError))
    bad_cases.append(({"state": {}}, LoraConfigError))
    bad_cases.append((None, LoraConfigError))
    for sd, error in bad_cases:
        with pytest.raises(error):
            opt.load_state_dict(sd)
        now = opt.state_dict()
        assert now["param_groups"] == good["param_groups"]
        ref.assert_bitwise_equal(now["state"][0]["exp_avg"], good["state"][0]["exp_avg"])


def test_sgd_step_is_the_kernel_per_tensor(rng):
    layer = make_layer(rng, np.float32)
    opt = SGD(layer, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)
    A, bufA = layer.lora_a.copy(), np.zeros_like(layer.lora_a)
    for step in range(3):
        backprop(layer, rng)
        g = layer.grad_a.copy()
        opt.step()
        opt.zero_grad()
        K.sgd_step(A, g, bufA, 0.1, 0.9, 0.1, 0.01, 0, int(step == 0))
        ref.assert_bitwise_equal(layer.lora_a, A)


# --------------------------------------------------------------------------
# clip_grad_norm
def test_clip_grad_norm_scales_to_max_norm(rng, dtype):
    a, b = make_layer(rng, dtype), make_layer(rng, dtype)
    backprop(a, rng)
    backprop(b, rng)
    grads = [g.astype(np.float64) for g in (a.grad_a, a.grad_b, b.grad_a, b.grad_b)]
    total = math.sqrt(sum(float((g * g).sum()) for g in grads))
    got = clip_grad_norm([a, b], 0.5 * total)
    assert got == pytest.approx(total, rel=1e-12)
    coef = dtype(0.5 * total) / (dtype(total) + dtype(1e-6))
    for now, before in zip((a.grad_a, a.grad_b, b.grad_a, b.grad_b), grads):
        ref.assert_bitwise_equal(now, (before.astype(dtype) * coef).astype(dtype))
    after = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum())
                          for g in (a.grad_a, a.grad_b, b.grad_a, b.grad_b)))
    assert after == pytest.approx(0.5 * total, rel=1e-5)


def test_clip_grad_norm_below_the_limit_changes_nothing(rng):
    layer = make_layer(rng)
    other = make_layer(rng)  # no gradient: left out
    backprop(layer, rng)
    before = layer.grad_a.copy(), layer.grad_b.copy()
    total = clip_grad_norm(AdamW([layer, other]), 1e9)
    assert total > 0
    ref.assert_bitwise_equal(layer.grad_a, before[0])
    ref.assert_bitwise_equal(layer.grad_b, before[1])
    assert clip_grad_norm(other, 1.0) == 0.0


def test_clip_grad_norm_nonfinite(rng):
    layer = make_layer(rng)
    layer.lora_b = np.full((6, 2), 1e200)
    backprop(layer, rng)
    before = layer.grad_a.copy()
    with pytest.raises(LoraNonFiniteError):
        clip_grad_norm(layer, 1.0, error_if_nonfinite=True)
    ref.assert_bitwise_equal(layer.grad_a, before)
    assert math.isinf(clip_grad_norm(layer, 1.0))  # torch: scaled by 0 (inf total)
    with pytest.raises(LoraConfigError):
        clip_grad_norm(layer, float("nan"))
