"""LoraLinear: construction, validation, forward paths, state, factors, utilities."""

import copy
import math
import pickle

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference as ref
from numba_lora import (
    LoraConfigError,
    LoraDtypeError,
    LoraError,
    LoraLinear,
    LoraNonFiniteError,
    LoraShapeError,
    LoraStateError,
)


def make_layer(rng, out_features=12, in_features=7, rank=3, dtype=np.float64, alpha=6.0, **kw):
    W = rng.standard_normal((out_features, in_features)).astype(dtype)
    layer = LoraLinear(W, rank, alpha, seed=1, **kw)
    layer.lora_b = rng.standard_normal((out_features, rank))
    return layer, W


def expected_forward(layer, W_base, x, enabled=True):
    s = layer.scaling if enabled else 0.0
    return ref.forward(W_base, layer.lora_a, layer.lora_b, s, x)


# ------------------------------------------------------------- construction
def test_new_layer_reproduces_w_x(dtype, rng):
    W = rng.standard_normal((10, 6)).astype(dtype)
    layer = LoraLinear(W, 2, 4.0, seed=0)
    x = rng.standard_normal(6).astype(dtype)
    np.testing.assert_array_equal(layer.lora_b, 0)
    ref.assert_close(layer.forward(x), *ref.forward(W, np.zeros((1, 6)), np.zeros((10, 1)), 0, x), dtype)
    assert layer.dtype == dtype
    assert (layer.out_features, layer.in_features, layer.rank) == (10, 6, 2)


def test_weight_is_an_owned_c_contiguous_copy(rng):
    W = np.asfortranarray(rng.standard_normal((5, 4)))
    layer = LoraLinear(W, 1, 1.0)
    W[:] = 0
    assert layer.weight.flags.c_contiguous
    assert np.all(layer.weight != 0)


def test_kaiming_uniform_init_statistics():
    in_features = 400
    layer = LoraLinear(np.zeros((300, in_features), np.float32), 64, 1.0, seed=3)
    bound = 1 / math.sqrt(in_features)
    A = layer.lora_a.astype(np.float64)
    assert A.shape == (64, in_features)
    assert np.all(np.abs(A) <= bound)
    # Uniform on [-b, b]: mean 0, variance b^2 / 3; 25600 draws.
    assert abs(A.mean()) < 0.02 * bound
    assert A.var() == pytest.approx(bound**2 / 3, rel=0.03)
    assert A.min() < -0.99 * bound and A.max() > 0.99 * bound


def test_seeding(rng):
    W = rng.standard_normal((8, 8))
    a0 = LoraLinear(W, 4, 1.0, seed=7).lora_a
    np.testing.assert_array_equal(a0, LoraLinear(W, 4, 1.0, seed=7).lora_a)
    np.testing.assert_array_equal(a0, LoraLinear(W, 4, 1.0, seed=np.random.default_rng(7)).lora_a)
    assert not np.array_equal(a0, LoraLinear(W, 4, 1.0, seed=8).lora_a)
    assert not np.array_equal(LoraLinear(W, 4, 1.0).lora_a, LoraLinear(W, 4, 1.0).lora_a)
    # float32 and float64 layers with one seed start from the same numbers.
    a32 = LoraLinear(W.astype(np.float32), 4, 1.0, seed=7).lora_a
    np.testing.assert_array_equal(a32, a0.astype(np.float32))


@pytest.mark.parametrize("rank, rslora, expected", [(4, False, 2.0), (4, True, 4.0), (8, False, 1.0)])
def test_scaling(rank, rslora, expected):
    layer = LoraLinear(np.ones((8, 8)), rank, 8.0, use_rslora=rslora)
    assert layer.scaling == expected
    assert layer.use_rslora is rslora


@pytest.mark.parametrize(
    "rank, alpha, match",
    [
        (0, 1.0, "rank must be an integer >= 1, got 0"),
        (-2, 1.0, "got -2"),
        (2.0, 1.0, "rank must be an integer"),
        (True, 1.0, "rank must be an integer"),
        (2, 0.0, "alpha must be a finite real number > 0, got 0.0"),
        (2, -1.0, "got -1.0"),
        (2, float("nan"), "got nan"),
        (2, float("inf"), "got inf"),
        (2, "1", "alpha must be a finite real number"),
        (5, 1.0, r"rank must be <= min\(out_features, in_features\) = 4 .* got 5"),
    ],
)
def test_config_errors(rank, alpha, match):
    with pytest.raises(LoraConfigError, match=match) as info:
        LoraLinear(np.ones((6, 4)), rank, alpha)
    assert isinstance(info.value, ValueError) and isinstance(info.value, LoraError)


def test_rank_equal_to_min_dimension_is_allowed():
    layer = LoraLinear(np.ones((6, 4)), 4, 1.0)
    assert layer.rank == 4
    assert LoraLinear(np.ones((1, 1)), 1, 1.0).trainable_params == 2
    assert LoraLinear(np.ones((2, 3)), np.int64(2), np.float32(3)).rank == 2


@pytest.mark.parametrize(
    "weight, error, match",
    [
        (np.ones(5), LoraShapeError, "weight must be 2-D .* got 1-D"),
        (np.ones((2, 2, 2)), LoraShapeError, "got 3-D"),
        (np.ones((0, 3)), LoraShapeError, r"got shape \(0, 3\)"),
        (np.ones((3, 0)), LoraShapeError, r"got shape \(3, 0\)"),
        (np.ones((3, 3), dtype=np.int64), LoraDtypeError, "got int64"),
        (np.ones((3, 3), dtype=bool), LoraDtypeError, "got bool"),
        (np.ones((3, 3), dtype=np.complex128), LoraDtypeError, "got complex128"),
    ],
)
def test_weight_errors(weight, error, match):
    with pytest.raises(error, match=match):
        LoraLinear(weight, 1, 1.0)


def test_weight_dtypes_kept_or_widened():
    assert LoraLinear(np.ones((2, 2), np.float16), 1, 1.0).dtype == np.float32
    assert LoraLinear(np.ones((2, 2), np.float32), 1, 1.0).dtype == np.float32
    assert LoraLinear([[1.0, 2.0]], 1, 1.0).dtype == np.float64


def test_non_finite_weights_are_allowed():
    W = np.ones((3, 3))
    W[1, 1] = np.nan
    layer = LoraLinear(W, 1, 1.0)
    y = layer.forward(np.ones(3))
    assert np.isnan(y[1]) and np.isfinite(y[0])


# ----------------------------------------------------------------- forward
@given(
    out_features=st.integers(1, 24),
    in_features=st.integers(1, 24),
    rank_frac=st.floats(0, 1),
    batch=st.integers(0, 6),
    dtype=st.sampled_from(ref.DTYPES),
    seed=st.integers(0, 2**31),
)
def test_forward_paths_match_reference(out_features, in_features, rank_frac, batch, dtype, seed):
    rng = np.random.default_rng(seed)
    rank = 1 + int(rank_frac * (min(out_features, in_features) - 1))
    layer, W = make_layer(rng, out_features, in_features, rank, dtype)
    X = rng.standard_normal((batch, in_features)).astype(dtype)
    Y = layer.forward_batch(X)
    assert Y.shape == (batch, out_features) and Y.dtype == dtype
    ref.assert_close(Y, *expected_forward(layer, W, X), dtype)
    if batch:
        ref.assert_close(layer.forward(X[0]), *expected_forward(layer, W, X[0]), dtype)
        ref.assert_close(layer(X), *expected_forward(layer, W, X), dtype)


def test_call_keeps_leading_shape(dtype, rng):
    layer, W = make_layer(rng, dtype=dtype)
    x = rng.standard_normal((2, 3, 7)).astype(dtype)
    y = layer(x)
    assert y.shape == (2, 3, 12)
    ref.assert_close(y, *expected_forward(layer, W, x), dtype)
    assert layer(x[0, 0]).shape == (12,)
    assert layer(np.zeros((0, 7))).shape == (0, 12)
    assert layer(np.zeros((2, 0, 7))).shape == (2, 0, 12)


def test_inputs_are_converted_to_the_layer_dtype(rng):
    layer, W = make_layer(rng, dtype=np.float32)
    x64 = rng.standard_normal(7)
    y = layer.forward(x64)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, layer.forward(x64.astype(np.float32)))
    assert layer.forward_batch([[1, 2, 3, 4, 5, 6, 7]]).dtype == np.float32
    assert layer(np.ones(7, np.float64)).dtype == np.float32
    layer64, _ = make_layer(rng, dtype=np.float64)
    assert layer64.forward(np.ones(7, np.float32)).dtype == np.float64


def test_non_contiguous_input(rng):
    layer, W = make_layer(rng)
    X = rng.standard_normal((7, 5)).T  # F-ordered (5, 7)
    ref.assert_close(layer.forward_batch(X), *expected_forward(layer, W, X), np.float64)
    x = rng.standard_normal(14)[::2]
    ref.assert_close(layer.forward(x), *expected_forward(layer, W, x), np.float64)


@pytest.mark.parametrize(
    "method, arg, match",
    [
        ("forward", np.ones(6), r"x has in_features = 6 \(axis 0\), expected 7"),
        ("forward", np.ones((1, 7)), "x must be 1-D"),
        ("forward_batch", np.ones((2, 8)), r"X has in_features = 8 \(axis 1\), expected 7"),
        ("forward_batch", np.ones(7), r"X must be 2-D .* got 1-D"),
        ("__call__", np.ones((3, 5)), r"x must have shape \(..., in_features=7\), got \(3, 5\)"),
        ("__call__", np.float64(1.0), r"in_features=7\), got \(\)"),
    ],
)
def test_input_shape_errors(method, arg, match, rng):
    layer, _ = make_layer(rng)
    with pytest.raises(LoraShapeError, match=match):
        getattr(layer, method)(arg)


def test_input_dtype_errors(rng):
    layer, _ = make_layer(rng)
    for bad in (np.ones(7, complex), np.ones(7, bool), np.array(["a"] * 7)):
        with pytest.raises(LoraDtypeError, match="x must hold real numbers"):
            layer.forward(bad)


def test_out_argument(dtype, rng):
    layer, W = make_layer(rng, dtype=dtype)
    x = rng.standard_normal(7).astype(dtype)
    out = np.empty(12, dtype)
    assert layer.forward(x, out=out) is out
    ref.assert_close(out, *expected_forward(layer, W, x), dtype)
    X = rng.standard_normal((4, 7)).astype(dtype)
    out2 = np.empty((4, 12), dtype)
    assert layer.forward_batch(X, out=out2) is out2
    out3 = np.empty((2, 2, 12), dtype)
    layer(X.reshape(2, 2, 7), out=out3)
    np.testing.assert_array_equal(out3.reshape(4, 12), out2)


@pytest.mark.parametrize(
    "out, error, match",
    [
        (np.empty(11), LoraShapeError, r"out must have shape \(12,\), got \(11,\)"),
        (np.empty(12, np.float32), LoraDtypeError, "out must have the layer's dtype float64, got float32"),
        (np.empty(24)[::2], LoraShapeError, "C-contiguous"),
        ([0.0] * 12, TypeError, "out must be a numpy.ndarray"),
    ],
)
def test_out_errors(out, error, match, rng):
    layer, _ = make_layer(rng)
    with pytest.raises(error, match=match):
        layer.forward(np.ones(7), out=out)


def test_out_must_not_alias_input(rng):
    layer, _ = make_layer(rng, out_features=7, in_features=7)
    x = np.ones(7)
    with pytest.raises(ValueError, match="overlap"):
        layer.forward(x, out=x)
    readonly = np.empty(7)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        layer.forward(x, out=readonly)


# ------------------------------------------------------------------ state
def test_merge_and_unmerge(dtype, rng):
    layer, W = make_layer(rng, dtype=dtype)
    x = rng.standard_normal((3, 7)).astype(dtype)
    before = layer(x)
    layer.merge()
    assert layer.is_merged
    ref.assert_close(layer.weight, *ref.merged(W, layer.lora_a, layer.lora_b, layer.scaling), dtype)
    ref.assert_close(layer(x), *expected_forward(layer, W, x), dtype)
    layer.unmerge()
    assert not layer.is_merged
    bound = np.spacing(np.abs(W)) + np.spacing(np.abs(W + layer.scaling * (layer.lora_b @ layer.lora_a)))
    assert np.all(np.abs(layer.weight - W) <= bound)
    ref.assert_close(layer(x), *ref.forward(W, layer.lora_a, layer.lora_b, layer.scaling, x), dtype)
    assert before.shape == (3, 12)


def test_state_errors(rng):
    layer, _ = make_layer(rng)
    with pytest.raises(LoraStateError, match="not merged") as info:
        layer.unmerge()
    assert isinstance(info.value, RuntimeError)
    layer.merge()
    with pytest.raises(LoraStateError, match="already merged"):
        layer.merge()
    with pytest.raises(LoraStateError, match="already merged"):
        layer.merge(check_finite=True)


def test_many_merge_cycles_do_not_drift(rng):
    layer, W = make_layer(rng, dtype=np.float32)
    layer.merge()
    layer.unmerge()
    after_first = layer.weight.copy()
    for _ in range(200):
        layer.merge()
        layer.unmerge()
    np.testing.assert_array_equal(layer.weight, after_first)


@pytest.mark.parametrize("merged", [False, True])
def test_disable_gives_base_output_in_every_state(merged, dtype, rng):
    layer, W = make_layer(rng, dtype=dtype)
    x = rng.standard_normal((4, 7)).astype(dtype)
    if merged:
        layer.merge()
    layer.disable()
    assert not layer.is_enabled
    base = ref.forward(W, layer.lora_a, layer.lora_b, 0.0, x)
    # Merged and disabled subtracts the low-rank term again: allow its terms too.
    magnitude = expected_forward(layer, W, x)[1] + base[1]
    ref.assert_close(layer(x), base[0], magnitude, dtype)
    ref.assert_close(layer.forward(x[0]), base[0][0], magnitude[0], dtype)
    layer.enable()
    assert layer.is_enabled
    ref.assert_close(layer(x), *expected_forward(layer, W, x), dtype)
    assert layer.is_merged is merged


def test_checked_merge_refuses_and_leaves_w_bit_identical(rng):
    layer, _ = make_layer(rng, dtype=np.float32)
    a = np.array(layer.lora_a)
    a[0, 3] = 3e38
    layer.lora_a = a
    layer.lora_b = np.ones((12, 3))
    before = layer.weight.copy()
    with pytest.raises(LoraNonFiniteError, match="merge would leave 12 of 84 weight elements"):
        layer.merge(check_finite=True)
    np.testing.assert_array_equal(layer.weight, before)
    assert not layer.is_merged
    layer.lora_a = np.zeros((3, 7))
    layer.merge(check_finite=True)
    assert layer.is_merged


def test_checked_merge_counts_existing_non_finite_weights():
    W = np.ones((4, 4))
    W[0, 0] = np.inf
    layer = LoraLinear(W, 1, 1.0)
    with pytest.raises(LoraNonFiniteError, match="1 of 16"):
        layer.merge(check_finite=True)
    layer.merge()  # unchecked merge keeps the user's data as it is
    assert np.isinf(layer.weight[0, 0])


# ------------------------------------------------------------------ factors
@pytest.mark.parametrize("merged", [False, True])
def test_set_factors_keeps_w_consistent(merged, dtype, rng):
    layer, W = make_layer(rng, dtype=dtype)
    old_delta = layer.scaling * (layer.lora_b.astype(np.float64) @ layer.lora_a)
    if merged:
        layer.merge()
    new_a = rng.standard_normal((3, 7))
    new_b = rng.standard_normal((12, 3))
    layer.set_lora_a(new_a)
    layer.lora_b = new_b
    np.testing.assert_array_equal(layer.lora_a, new_a.astype(dtype))
    np.testing.assert_array_equal(layer.lora_b, new_b.astype(dtype))
    if not merged:
        np.testing.assert_array_equal(layer.weight, W)
        return
    new_delta = layer.scaling * (layer.lora_b.astype(np.float64) @ layer.lora_a)
    # Old delta out, new delta in: the old delta's terms count in the tolerance.
    expected, magnitude = ref.merged(W, layer.lora_a, layer.lora_b, layer.scaling)
    ref.assert_close(layer.weight, expected, magnitude + np.abs(old_delta), dtype)
    layer.unmerge()
    # Three roundings since the base weight was last exact.
    bound = 3 * np.spacing((np.abs(W) + np.abs(old_delta) + np.abs(new_delta)).astype(dtype))
    assert np.all(np.abs(layer.weight - W) <= bound)


def test_factors_are_copied_and_read_only(rng):
    layer, _ = make_layer(rng)
    a = rng.standard_normal((3, 7))
    layer.lora_a = a
    a[:] = 0
    assert np.all(layer.lora_a != 0)
    for view in (layer.weight, layer.lora_a, layer.lora_b):
        with pytest.raises(ValueError, match="read-only"):
            view[0, 0] = 1.0


@pytest.mark.parametrize(
    "setter, value, match",
    [
        ("set_lora_a", np.ones((3, 6)), r"lora_a has in_features = 6 \(axis 1\), expected 7"),
        ("set_lora_a", np.ones((2, 7)), r"lora_a has rank = 2 \(axis 0\), expected 3"),
        ("set_lora_a", np.ones(21), r"lora_a must be 2-D with shape \(rank=3, in_features=7\)"),
        ("set_lora_b", np.ones((11, 3)), r"lora_b has out_features = 11 \(axis 0\), expected 12"),
        ("set_lora_b", np.ones((12, 4)), r"lora_b has rank = 4 \(axis 1\), expected 3"),
    ],
)
def test_factor_shape_errors_leave_layer_unchanged(setter, value, match, rng):
    layer, _ = make_layer(rng)
    layer.merge()
    before = (layer.weight.copy(), layer.lora_a.copy(), layer.lora_b.copy())
    with pytest.raises(LoraShapeError, match=match):
        getattr(layer, setter)(value)
    for got, want in zip((layer.weight, layer.lora_a, layer.lora_b), before):
        np.testing.assert_array_equal(got, want)


def test_factor_dtype_error(rng):
    layer, _ = make_layer(rng)
    with pytest.raises(LoraDtypeError, match="lora_b must hold real numbers"):
        layer.lora_b = np.ones((12, 3), dtype=complex)


# ---------------------------------------------------------------- utilities
def test_param_counts():
    layer = LoraLinear(np.zeros((64, 32)), 8, 16.0)
    assert layer.trainable_params == 768
    assert layer.total_params == 2816
    assert layer.compression_ratio == pytest.approx(768 / 2816)


@pytest.mark.parametrize("clone", [lambda l: l.copy(), copy.copy, copy.deepcopy,
                                   lambda l: pickle.loads(pickle.dumps(l))])
def test_copies_are_independent(clone, rng):
    layer, _ = make_layer(rng)
    layer.merge()
    layer.disable()
    other = clone(layer)
    assert other.is_merged and not other.is_enabled
    np.testing.assert_array_equal(other.weight, layer.weight)
    other.unmerge()
    other.lora_b = np.zeros((12, 3))
    assert layer.is_merged
    assert np.any(layer.lora_b != 0)
    x = np.ones(7)
    np.testing.assert_array_equal(other.forward(x), other.forward(x))


def test_repr(rng):
    layer, _ = make_layer(rng, dtype=np.float32)
    text = repr(layer)
    for part in ("LoraLinear(", "out_features=12", "in_features=7", "rank=3", "alpha=6",
                 "scaling=2", "float32", "merged=False", "enabled=True"):
        assert part in text


def _stacked(layer):
    """A starts right where W ends: one C-contiguous buffer [W; A]."""
    w, a = layer.weight, layer.lora_a
    return w.ctypes.data + w.nbytes == a.ctypes.data


def test_w_and_a_share_one_buffer_for_one_pass_forwards(dtype, rng):
    # Issue "decode speed": A is stacked under W, both C-contiguous views.
    W = rng.standard_normal((40, 24)).astype(dtype)
    layer = LoraLinear(W, 4, 8.0, seed=1)
    layer.lora_b = rng.standard_normal((40, 4))
    assert layer.weight.flags.c_contiguous and layer.lora_a.flags.c_contiguous
    assert _stacked(layer)
    for rows in (1, 2, 8, 9, 33):  # stacked kernels up to 8 rows, then the plain one
        X = rng.standard_normal((rows, 24)).astype(dtype)
        expected = ref.forward(W, layer.lora_a, layer.lora_b, layer.scaling, X)
        ref.assert_close(layer.forward_batch(X), *expected, dtype)
        ref.assert_close(layer.forward(X[0]), *ref.forward(W, layer.lora_a, layer.lora_b,
                                                          layer.scaling, X[0]), dtype)
    new_a = rng.standard_normal((4, 24))
    layer.lora_a = new_a  # written into the shared buffer
    assert _stacked(layer)
    np.testing.assert_array_equal(layer.lora_a, new_a.astype(dtype))
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert _stacked(other)
        assert not np.shares_memory(other.weight, layer.weight)
        ref.assert_bitwise_equal(other.weight, layer.weight)
        ref.assert_bitwise_equal(other.lora_a, layer.lora_a)


def test_unpickles_a_layer_stored_with_w_and_a_apart(dtype, rng):
    layer = LoraLinear(rng.standard_normal((6, 5)).astype(dtype), 2, 4.0, seed=0)
    state = layer.__getstate__()
    WA = state.pop("_WA")
    state["_W"], state["_A"] = WA[:6].copy(), WA[6:].copy()  # numba_lora 0.1's layout
    old = object.__new__(LoraLinear)
    old.__setstate__(state)
    ref.assert_bitwise_equal(old.weight, layer.weight)
    ref.assert_bitwise_equal(old.lora_a, layer.lora_a)
    assert _stacked(old)
