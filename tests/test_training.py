"""LoraLinear's training API: forward_train, backward, gradients, state rules, init options."""

import copy
import pickle

import numpy as np
import pytest

import reference as ref
from numba_lora import (
    LoraAdapter,
    LoraConfig,
    LoraConfigError,
    LoraDtypeError,
    LoraLinear,
    LoraShapeError,
    LoraStateError,
    LoraTypeError,
)
from numba_lora.training import TrainContext, keep_scale


def make_layer(rng, dtype=np.float64, out_f=6, in_f=5, rank=2, **kw):
    layer = LoraLinear(rng.standard_normal((out_f, in_f)).astype(dtype), rank=rank, alpha=3.0,
                       seed=1, **kw)
    layer.lora_b = rng.standard_normal((out_f, rank))
    return layer


def expected(layer, X, dY, mask=None, p=0.0):
    """(Y, dX, dA, dB) in float64 from the layer's arrays."""
    W, A, B, X, dY = ref.f64(layer.weight, layer.lora_a, layer.lora_b, X, dY)
    s = layer.scaling
    D = 1.0 if mask is None else mask * np.float64(keep_scale(p, layer.dtype))
    XL = X * D
    G = dY @ B
    return (X @ W.T + s * (XL @ A.T) @ B.T, dY @ W + s * (G @ A) * D, s * G.T @ XL,
            s * dY.T @ (XL @ A.T))


def test_forward_train_and_backward_match_the_reference(rng, dtype):
    layer = make_layer(rng, dtype)
    X = rng.standard_normal((4, 5)).astype(dtype)
    dY = rng.standard_normal((4, 6)).astype(dtype)
    Y, ctx = layer.forward_train(X)
    assert isinstance(ctx, TrainContext) and ctx.mask is None and ctx.batch == 4
    dX = layer.backward(dY, ctx)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for got, want in zip((Y, dX, layer.grad_a, layer.grad_b), expected(layer, X, dY)):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
    np.testing.assert_allclose(Y, layer.forward_batch(X), rtol=tol, atol=tol)


def test_rslora_scaling_enters_the_gradients(rng):
    layer = make_layer(rng, use_rslora=True, rank=3)
    assert layer.scaling == pytest.approx(3.0 / np.sqrt(3))
    X, dY = rng.standard_normal((3, 5)), rng.standard_normal((3, 6))
    Y, ctx = layer.forward_train(X)
    dX = layer.backward(dY, ctx)
    for got, want in zip((Y, dX, layer.grad_a, layer.grad_b), expected(layer, X, dY)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_dropout_masks_the_lora_branch_only_and_is_seeded(rng):
    layer = make_layer(rng)
    X, dY = rng.standard_normal((7, 5)), rng.standard_normal((7, 6))
    Y, ctx = layer.forward_train(X, dropout=0.3, rng=np.random.default_rng(5))
    assert ctx.mask is not None and ctx.mask.dtype == bool and not ctx.mask.all()
    np.testing.assert_array_equal(ctx.mask, np.random.default_rng(5).random(X.shape) >= 0.3)
    dX = layer.backward(dY, ctx)
    for got, want in zip((Y, dX, layer.grad_a, layer.grad_b),
                         expected(layer, X, dY, np.asarray(ctx.mask), 0.3)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    Y2, ctx2 = layer.copy().forward_train(X, dropout=0.3, rng=5)
    ref.assert_bitwise_equal(Y2, Y)
    # Without dropout, the LoRA input is X itself (no copy).
    _, ctx0 = layer.forward_train(X)
    assert np.shares_memory(ctx0.XL, X) or ctx0.XL.base is not None


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, np.nan, True, "0.1", None])
def test_dropout_out_of_range_is_refused(rng, p):
    layer = make_layer(rng)
    with pytest.raises(LoraConfigError, match="dropout"):
        layer.forward_train(np.ones((2, 5)), dropout=p)


def test_gradients_accumulate_until_zero_grad(rng, dtype):
    layer = make_layer(rng, dtype)
    assert layer.grad_a is None and layer.grad_b is None
    X1, X2 = rng.standard_normal((3, 5)).astype(dtype), rng.standard_normal((2, 5)).astype(dtype)
    d1, d2 = rng.standard_normal((3, 6)).astype(dtype), rng.standard_normal((2, 6)).astype(dtype)
    _, c1 = layer.forward_train(X1)
    _, c2 = layer.forward_train(X2)
    layer.backward(d1, c1)
    first = layer.grad_a.copy(), layer.grad_b.copy()
    layer.backward(d2, c2, input_grad=False)
    both = expected(layer, np.vstack([X1, X2]), np.vstack([d1, d2]))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(layer.grad_a, both[2], rtol=tol, atol=tol)
    np.testing.assert_allclose(layer.grad_b, both[3], rtol=tol, atol=tol)
    with pytest.raises(ValueError):
        layer.grad_a[0, 0] = 1.0  # a read-only view
    layer.zero_grad()
    assert layer.grad_a is None and layer.grad_b is None
    layer.backward(d1, c1)  # overwrites: no stale sum
    ref.assert_bitwise_equal(layer.grad_a, first[0])
    ref.assert_bitwise_equal(layer.grad_b, first[1])


def test_input_grad_false_returns_none_and_the_same_factor_gradients(rng):
    layer = make_layer(rng)
    other = layer.copy()
    X, dY = rng.standard_normal((4, 5)), rng.standard_normal((4, 6))
    _, ctx = layer.forward_train(X, dropout=0.2, rng=0)
    _, ctx2 = other.forward_train(X, dropout=0.2, rng=0)
    assert layer.backward(dY, ctx, input_grad=False) is None
    other.backward(dY, ctx2)
    ref.assert_bitwise_equal(layer.grad_a, other.grad_a)
    ref.assert_bitwise_equal(layer.grad_b, other.grad_b)


def test_batch_zero_and_one(rng):
    layer = make_layer(rng)
    Y, ctx = layer.forward_train(np.zeros((0, 5)), dropout=0.5, rng=0)
    assert Y.shape == (0, 6)
    dX = layer.backward(np.zeros((0, 6)), ctx)
    assert dX.shape == (0, 5)
    assert not layer.grad_a.any() and not layer.grad_b.any()
    X, dY = rng.standard_normal((1, 5)), rng.standard_normal((1, 6))
    layer.zero_grad()
    Y, ctx = layer.forward_train(X)
    dX = layer.backward(dY, ctx)
    for got, want in zip((Y, dX, layer.grad_a, layer.grad_b), expected(layer, X, dY)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_merged_layer_refuses_training(rng):
    layer = make_layer(rng)
    X, dY = rng.standard_normal((2, 5)), rng.standard_normal((2, 6))
    _, ctx = layer.forward_train(X)
    layer.merge()
    W = layer.weight.copy()
    with pytest.raises(LoraStateError, match="merged"):
        layer.forward_train(X)
    with pytest.raises(LoraStateError, match="merged"):
        layer.backward(dY, ctx)
    assert layer.grad_a is None
    ref.assert_bitwise_equal(layer.weight, W)
    layer.unmerge()
    layer.backward(dY, ctx)  # fine again: A and B did not change
    assert layer.grad_a is not None


def test_disabled_layer_gives_the_dense_gradient_and_no_factor_gradients(rng):
    layer = make_layer(rng)
    X, dY = rng.standard_normal((3, 5)), rng.standard_normal((3, 6))
    layer.disable()
    Y, ctx = layer.forward_train(X, dropout=0.5, rng=0)
    assert not ctx.lora and ctx.mask is None
    W = layer.weight.astype(np.float64)
    np.testing.assert_allclose(Y, X @ W.T, rtol=1e-13)
    np.testing.assert_allclose(layer.backward(dY, ctx), dY @ W, rtol=1e-13)
    assert layer.grad_a is None and layer.grad_b is None
    with layer.disable_adapter():
        pass


def test_stale_or_foreign_context_is_refused(rng):
    layer, other = make_layer(rng), make_layer(rng)
    X, dY = rng.standard_normal((2, 5)), rng.standard_normal((2, 6))
    _, ctx = layer.forward_train(X)
    with pytest.raises(LoraTypeError, match="another layer"):
        other.backward(dY, ctx)
    with pytest.raises(LoraTypeError):
        layer.backward(dY, "ctx")
    with pytest.raises(LoraShapeError, match="dY"):
        layer.backward(np.ones((3, 6)), ctx)
    layer.lora_b = layer.lora_b * 2
    with pytest.raises(LoraStateError, match="changed"):
        layer.backward(dY, ctx)
    assert layer.grad_a is None


def test_context_arrays_are_read_only(rng):
    layer = make_layer(rng)
    X = rng.standard_normal((2, 5))
    _, ctx = layer.forward_train(X, dropout=0.5, rng=1)
    for array in (ctx.X, ctx.XL, ctx.H, ctx.mask):
        with pytest.raises(ValueError):
            array[0, 0] = 0
    X[0, 0] = 1.0  # the caller's own array stays writable
    assert "TrainContext(batch=2" in repr(ctx)


def test_copy_and_pickle_keep_the_gradients(rng):
    layer = make_layer(rng, np.float32)
    _, ctx = layer.forward_train(rng.standard_normal((2, 5)))
    layer.backward(rng.standard_normal((2, 6)), ctx)
    for clone in (layer.copy(), copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        ref.assert_bitwise_equal(clone.grad_a, layer.grad_a)
        ref.assert_bitwise_equal(clone.grad_b, layer.grad_b)
        clone.zero_grad()
        assert layer.grad_a is not None


def test_adapter_layers_and_zero_grad(rng):
    adapter = LoraAdapter(LoraConfig(r=2, lora_alpha=4))
    fc1 = adapter.add_layer("fc1", rng.standard_normal((6, 5)))
    fc2 = adapter.add_layer("fc2", rng.standard_normal((3, 6)))
    assert adapter.layers() == [fc1, fc2]
    X = rng.standard_normal((4, 5))
    h, c1 = adapter["fc1"].forward_train(X)
    y, c2 = adapter["fc2"].forward_train(np.maximum(h, 0))
    dh = adapter["fc2"].backward(np.ones_like(y), c2)
    adapter["fc1"].backward(dh * (h > 0), c1, input_grad=False)
    assert fc1.grad_a is not None and fc2.grad_b is not None
    adapter.zero_grad()
    assert fc1.grad_a is None and fc2.grad_b is None


# --------------------------------------------------------------------------
# Initialisations
def test_default_init_is_unchanged(rng):
    W = rng.standard_normal((8, 6))
    a = LoraLinear(W, rank=2, alpha=4.0, seed=3)
    b = LoraLinear(W, rank=2, alpha=4.0, seed=3, init="peft")
    ref.assert_bitwise_equal(a.lora_a, b.lora_a)
    bound = 1 / np.sqrt(6)
    assert np.abs(a.lora_a).max() <= bound and not a.lora_b.any()


def test_gaussian_init_has_std_one_over_rank(rng):
    layer = LoraLinear(rng.standard_normal((4, 4000)), rank=4, alpha=4.0, seed=0, init="gaussian")
    assert layer.lora_a.std() == pytest.approx(0.25, rel=0.05)
    assert not layer.lora_b.any()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_init_keeps_the_output_and_takes_the_top_triplets(rng, dtype, use_rslora):
    W = rng.standard_normal((12, 9)).astype(dtype)
    layer = LoraLinear(W, rank=3, alpha=6.0, seed=0, init="pissa", use_rslora=use_rslora)
    s = layer.scaling
    A, B = layer.lora_a.astype(np.float64), layer.lora_b.astype(np.float64)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(layer.weight + s * B @ A, W, atol=tol * np.abs(W).max() * 4)
    S = np.linalg.svd(W.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(s * np.linalg.svd(B @ A, compute_uv=False)[:3], S[:3], rtol=tol * 10)
    np.testing.assert_allclose(A @ A.T, np.diag(S[:3] / s), atol=tol * 10 * S[0])
    X = rng.standard_normal((2, 9)).astype(dtype)
    np.testing.assert_allclose(layer.forward_batch(X),
                               X.astype(np.float64) @ W.T.astype(np.float64),
                               rtol=tol * 10, atol=tol * 10 * np.abs(W).sum())


@pytest.mark.parametrize("init", ["kaiming", "", None, True, "PISSA"])
def test_unknown_init_is_refused(rng, init):
    with pytest.raises(LoraConfigError, match="init"):
        LoraLinear(rng.standard_normal((4, 4)), rank=1, alpha=1.0, init=init)


# --------------------------------------------------------------------------
def test_a_short_training_run_lowers_the_loss(rng):
    from numba_lora.optim import AdamW

    W = rng.standard_normal((4, 8)).astype(np.float32)
    target = W + 0.5 * rng.standard_normal((4, 2)) @ rng.standard_normal((2, 8))
    layer = LoraLinear(W, rank=2, alpha=2.0, seed=0)
    opt = AdamW(layer, lr=5e-2)
    X = rng.standard_normal((64, 8)).astype(np.float32)
    T = X @ target.T.astype(np.float32)
    losses = []
    for _ in range(60):
        Y, ctx = layer.forward_train(X)
        R = Y - T
        losses.append(float((R.astype(np.float64) ** 2).mean()))
        layer.backward(2 * R / R.size, ctx, input_grad=False)
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.1 * losses[0]
    # The trained layer's A is still the view stacked under W.
    assert layer._A.base is layer._WA or np.shares_memory(layer._A, layer._WA)


def test_a_given_mask_replays_dropout(rng):
    layer = make_layer(rng, np.float32)
    X = rng.standard_normal((3, 5)).astype(np.float32)
    drawn, ctx = layer.forward_train(X, dropout=0.4, rng=9)
    given, ctx2 = layer.forward_train(X, dropout=0.4, mask=np.asarray(ctx.mask).tolist())
    ref.assert_bitwise_equal(given, drawn)
    ref.assert_bitwise_equal(ctx2.XL, ctx.XL)
    # torch's nn.Dropout: x * (1 / (1 - p) rounded once), 0 where dropped.
    ref.assert_bitwise_equal(ctx2.XL, X * (ctx.mask * (np.float32(1) / np.float32(0.6))))
    with pytest.raises(LoraConfigError, match="dropout > 0"):
        layer.forward_train(X, mask=np.ones((3, 5), bool))
    with pytest.raises(LoraShapeError, match="mask"):
        layer.forward_train(X, dropout=0.1, mask=np.ones((3, 4), bool))
    with pytest.raises(LoraDtypeError, match="bool"):
        layer.forward_train(X, dropout=0.1, mask=np.ones((3, 5)))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_to_lora_is_the_learned_update_over_the_original_base(rng, use_rslora):
    from numba_lora.training import pissa_to_lora

    W = rng.standard_normal((7, 6))
    layer = LoraLinear(W, rank=2, alpha=4.0, init="pissa", use_rslora=use_rslora)
    A0, B0 = layer.lora_a.copy(), layer.lora_b.copy()
    layer.lora_a = A0 + 0.1 * rng.standard_normal(A0.shape)
    layer.lora_b = B0 + 0.1 * rng.standard_normal(B0.shape)
    A2, B2, alpha2 = pissa_to_lora(layer.lora_a, layer.lora_b, A0, B0, layer.alpha,
                                   use_rslora=use_rslora)
    plain = LoraLinear(W, rank=4, alpha=alpha2, use_rslora=use_rslora)
    plain.lora_a, plain.lora_b = A2, B2
    assert plain.scaling == pytest.approx(layer.scaling)
    X = rng.standard_normal((3, 6))
    np.testing.assert_allclose(plain.forward_batch(X), layer.forward_batch(X), rtol=1e-12,
                               atol=1e-12)
    with pytest.raises(LoraShapeError):
        pissa_to_lora(A2, B2, A0, B0, 1.0)


def test_adapter_add_layer_takes_init(rng):
    adapter = LoraAdapter(LoraConfig(r=2, lora_alpha=4))
    W = rng.standard_normal((6, 5))
    layer = adapter.add_layer("fc", W, init="pissa")
    np.testing.assert_allclose(layer.weight + layer.scaling * layer.lora_b @ layer.lora_a, W,
                               atol=1e-12)
    with pytest.raises(LoraConfigError, match="init"):
        adapter.add_layer("fc2", W, init="olora")
    assert "fc2" not in adapter


def test_leading_dimensions_are_rows(rng, dtype):
    layer = make_layer(rng, dtype)
    other = layer.copy()
    X = rng.standard_normal((2, 3, 5)).astype(dtype)
    dY = rng.standard_normal((2, 3, 6)).astype(dtype)
    Y, ctx = layer.forward_train(X, dropout=0.3, rng=4)
    assert Y.shape == (2, 3, 6) and ctx.lead == (2, 3) and ctx.batch == 6
    assert ctx.mask.shape == (6, 5)
    dX = layer.backward(dY, ctx)
    assert dX.shape == (2, 3, 5)
    Y2, ctx2 = other.forward_train(X.reshape(6, 5), dropout=0.3, mask=np.asarray(ctx.mask))
    dX2 = other.backward(dY.reshape(6, 6), ctx2)
    ref.assert_bitwise_equal(Y.reshape(6, 6), Y2)
    ref.assert_bitwise_equal(dX.reshape(6, 5), dX2)
    ref.assert_bitwise_equal(layer.grad_a, other.grad_a)
    with pytest.raises(LoraShapeError, match="dY"):
        layer.backward(dY.reshape(6, 6), ctx)
    with pytest.raises(LoraShapeError, match="in_features"):
        layer.forward_train(np.ones((2, 3, 4)))
    with pytest.raises(LoraShapeError, match="in_features"):
        layer.forward_train(np.float64(1.0))
    y, ctx1 = layer.forward_train(np.ones(5, dtype))  # one vector
    assert y.shape == (6,) and layer.backward(np.ones(6), ctx1).shape == (5,)
