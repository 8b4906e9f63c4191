"""QLoraLinear: forward against the float64 reference over its own dequantized base, state,
factors, merge refused, copy/pickle, and a bitsandbytes Linear4bit state dict (no torch)."""

import copy
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from numba_lora import LoraConfigError, LoraDtypeError, LoraLinear, LoraShapeError, \
    LoraStateError, LoraTypeError, LoraUnsupportedError, nf4
from numba_lora.qlora import QLoraLinear

HERE = Path(__file__).resolve().parent / "fixtures" / "nf4"
RTOL = 1e-5


def reference(deq, A, B, scaling, X):
    """(y, magnitude) in float64: deq @ x + s B (A x), with the sum of |terms| for the tolerance."""
    deq, A, B, X = (np.asarray(a, np.float64) for a in (deq, A, B, X))
    y = X @ deq.T + scaling * (X @ A.T) @ B.T
    mag = np.abs(X) @ np.abs(deq).T + abs(scaling) * (np.abs(X) @ np.abs(A).T) @ np.abs(B).T
    return y, mag


def assert_matches(layer, X, y):
    """y within 1e-5 of the float64 reference, relative to the output's scale."""
    ref, mag = reference(layer.dequantize_weight(), layer.lora_a, layer.lora_b,
                         layer.scaling if layer.is_enabled else 0.0, X)
    assert y.dtype == np.float32 and y.shape == ref.shape
    scale = np.maximum(mag, np.abs(ref).max(initial=0.0))
    err = np.abs(y - ref)
    assert (err <= RTOL * scale + 1e-30).all(), f"worst {err.max():.3e}"


def make(rng, out_features=24, in_features=80, rank=4, **kwargs):
    W = rng.standard_normal((out_features, in_features)).astype(np.float32)
    layer = QLoraLinear(W, rank, 8.0, seed=1, **kwargs)
    layer.lora_b = rng.standard_normal((out_features, rank))
    return W, layer


# ----------------------------------------------------------------- forward
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("batch", [0, 1, 2, 7, 8, 64])
def test_forward_batch_matches_reference(rng, batch, double_quant):
    _, layer = make(rng, 33, 100, double_quant=double_quant, blocksize=32)
    X = rng.standard_normal((batch, 100)).astype(np.float32)
    Y = layer.forward_batch(X)
    assert Y.shape == (batch, 33)
    assert_matches(layer, X, Y)
    assert np.array_equal(layer(X), Y)


@pytest.mark.parametrize("double_quant", [False, True])
def test_forward_one_vector(rng, double_quant):
    _, layer = make(rng, double_quant=double_quant)
    x = rng.standard_normal(80).astype(np.float32)
    y = layer.forward(x)
    assert_matches(layer, x, y)
    assert np.array_equal(layer(x), y)
    out = np.full(24, np.nan, np.float32)
    assert layer.forward(x, out=out) is out and np.array_equal(out, y)
    # float64 input is converted; a list too.
    assert np.array_equal(layer(x.astype(np.float64)), y)
    assert np.array_equal(layer(x.tolist()), y)


@given(out_features=st.integers(1, 20), in_features=st.integers(1, 70), rank=st.integers(1, 4),
       batch=st.integers(0, 9), blocksize=st.sampled_from([32, 64, 128]),
       double_quant=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_forward_property(out_features, in_features, rank, batch, blocksize, double_quant, seed):
    rank = min(rank, out_features, in_features)
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((out_features, in_features)).astype(np.float32)
    layer = QLoraLinear(W, rank, 2.0, blocksize=blocksize, double_quant=double_quant, seed=seed)
    layer.lora_b = rng.standard_normal((out_features, rank))
    X = rng.standard_normal((batch, in_features)).astype(np.float32)
    assert_matches(layer, X, layer.forward_batch(X))
    x = rng.standard_normal(in_features).astype(np.float32)
    assert_matches(layer, x, layer.forward(x))


def test_call_shapes(rng):
    _, layer = make(rng)
    X = rng.standard_normal((2, 3, 80)).astype(np.float32)
    Y = layer(X)
    assert Y.shape == (2, 3, 24)
    assert np.array_equal(Y.reshape(6, 24), layer.forward_batch(X.reshape(6, 80)))
    out = np.empty((2, 3, 24), np.float32)
    assert layer(X, out=out) is out and np.array_equal(out, Y)


# ------------------------------------------------------------------- state
def test_enable_disable(rng):
    _, layer = make(rng)
    x = rng.standard_normal(80).astype(np.float32)
    full = layer(x)
    layer.disable()
    assert not layer.is_enabled
    base = layer(x)
    assert_matches(layer, x, base)
    with pytest.raises(AssertionError):
        np.testing.assert_array_equal(base, full)
    layer.enable()
    assert np.array_equal(layer(x), full)
    with layer.disable_adapter() as same:
        assert same is layer and np.array_equal(layer(x), base)
    assert layer.is_enabled
    with pytest.raises(RuntimeError):
        with layer.disable_adapter():
            raise RuntimeError("boom")
    assert layer.is_enabled


def test_set_lora_checks_and_converts(rng):
    _, layer = make(rng)
    A = rng.standard_normal((4, 80))
    layer.set_lora_a(A)
    assert layer.lora_a.dtype == np.float32 and np.array_equal(layer.lora_a, A.astype(np.float32))
    A[0, 0] = 99.0
    assert layer.lora_a[0, 0] != 99.0
    before = (layer.lora_a.copy(), layer.lora_b.copy())
    with pytest.raises(LoraShapeError, match="rank"):
        layer.set_lora_a(np.zeros((5, 80)))
    with pytest.raises(LoraShapeError, match="out_features"):
        layer.lora_b = np.zeros((23, 4))
    with pytest.raises(LoraDtypeError):
        layer.lora_b = np.zeros((24, 4), dtype=complex)
    assert np.array_equal(layer.lora_a, before[0]) and np.array_equal(layer.lora_b, before[1])
    with pytest.raises(ValueError):
        layer.lora_a[0, 0] = 1.0


def test_merge_refused_and_nothing_changes(rng):
    _, layer = make(rng)
    x = rng.standard_normal(80).astype(np.float32)
    y = layer(x)
    state = (layer.quantized, layer.lora_a.copy(), layer.lora_b.copy())
    with pytest.raises(LoraUnsupportedError, match="to_lora_linear"):
        layer.merge()
    with pytest.raises(LoraStateError):
        layer.unmerge()
    assert layer.quantized is state[0]
    assert np.array_equal(layer.lora_a, state[1]) and np.array_equal(layer.lora_b, state[2])
    assert not layer.is_merged and np.array_equal(layer(x), y)


@pytest.mark.parametrize("double_quant", [False, True])
def test_to_lora_linear(rng, double_quant):
    _, layer = make(rng, double_quant=double_quant)
    dense = layer.to_lora_linear()
    assert isinstance(dense, LoraLinear) and dense.dtype == np.float32
    assert np.array_equal(dense.weight, layer.dequantize_weight())
    assert np.array_equal(dense.lora_a, layer.lora_a) and np.array_equal(dense.lora_b, layer.lora_b)
    x = rng.standard_normal(80).astype(np.float32)
    ref, mag = reference(layer.dequantize_weight(), layer.lora_a, layer.lora_b, layer.scaling, x)
    assert (np.abs(dense(x) - ref) <= RTOL * mag).all()
    dense.merge()  # exact in float32, unlike a 4-bit merge
    assert (np.abs(dense(x) - ref) <= RTOL * mag).all()
    layer.disable()
    assert not layer.to_lora_linear().is_enabled


def test_sizes_and_counts(rng):
    W, layer = make(rng, 64, 128, rank=8)
    assert (layer.out_features, layer.in_features, layer.rank) == (64, 128, 8)
    assert layer.blocksize == 64 and not layer.double_quant and layer.dtype == np.float32
    assert layer.trainable_params == 8 * (64 + 128)
    assert layer.total_params == 64 * 128 + 8 * (64 + 128)
    q = layer.quantized
    assert q.nbytes == 64 * 128 // 2 + 4 * (64 * 128 // 64)
    assert layer.nbytes == q.nbytes + 4 * 8 * (64 + 128)
    assert layer.memory_saved_bytes == W.nbytes - q.nbytes
    assert layer.scaling == 1.0 and layer.alpha == 8.0
    assert QLoraLinear(W, 8, 8.0, use_rslora=True).scaling == pytest.approx(8 / np.sqrt(8))


def test_same_seed_same_a_as_lora_linear(rng):
    W = rng.standard_normal((10, 30)).astype(np.float32)
    assert np.array_equal(QLoraLinear(W, 3, 1.0, seed=7).lora_a, LoraLinear(W, 3, 1.0, seed=7).lora_a)
    assert not QLoraLinear(W, 3, 1.0, seed=7).lora_b.any()


@pytest.mark.parametrize("double_quant", [False, True])
def test_copy_and_pickle_bitwise(rng, double_quant):
    _, layer = make(rng, double_quant=double_quant)
    layer.disable()
    X = rng.standard_normal((5, 80)).astype(np.float32)
    y = layer(X)
    for other in (layer.copy(), copy.copy(layer), copy.deepcopy(layer),
                  pickle.loads(pickle.dumps(layer))):
        assert other is not layer and not other.is_enabled
        assert other.quantized == layer.quantized
        assert np.array_equal(other.lora_a, layer.lora_a)
        assert np.array_equal(other(X).view(np.uint32), y.view(np.uint32))
        other.lora_b = np.zeros((24, 4))  # its own factors
        other.enable()
    assert layer.lora_b.any() and not layer.is_enabled


def test_repr(rng):
    _, layer = make(rng, double_quant=True)
    text = repr(layer)
    assert text.startswith("QLoraLinear(out_features=24, in_features=80, rank=4, alpha=8")
    assert "blocksize=64" in text and "double_quant=True" in text


# ------------------------------------------------------------ constructors
@pytest.mark.parametrize("suffix", ["", "_dq"])
def test_bitsandbytes_linear4bit_fixture(suffix):
    ref = np.load(HERE / "linear4bit_ref.npz")
    layer = QLoraLinear.from_bnb_safetensors(HERE / f"linear4bit{suffix}.safetensors", 4, 8.0,
                                             seed=0)
    assert (layer.out_features, layer.in_features) == (40, 96)
    assert layer.double_quant == (suffix == "_dq")
    deq = ref["deq" + suffix]
    assert np.array_equal(layer.dequantize_weight().view(np.uint32), deq.view(np.uint32))
    layer.lora_b = np.random.default_rng(2).standard_normal((40, 4))
    x = ref["x"]
    Y = layer(x)
    want, mag = reference(deq, layer.lora_a, layer.lora_b, layer.scaling, x)
    assert (np.abs(Y - want) <= RTOL * np.maximum(mag, np.abs(want).max())).all()
    tensors = nf4.to_bnb_state_dict(layer.quantized, prefix="m.")
    again = QLoraLinear.from_bnb_state_dict(tensors, 4, 8.0, prefix="m.", seed=0)
    assert again.quantized == layer.quantized


def test_from_quantized_shares_the_base(rng):
    W = rng.standard_normal((12, 64)).astype(np.float32)
    q = nf4.quantize(W, 32, double_quant=True)
    layer = QLoraLinear.from_quantized(q, 2, 4.0)
    assert layer.quantized is q and layer.blocksize == 32 and layer.double_quant
    assert layer == layer and QLoraLinear(W, 2, 4.0, blocksize=32, double_quant=True).quantized == q
    with pytest.raises(LoraTypeError):
        QLoraLinear.from_quantized(W, 2, 4.0)
    with pytest.raises(LoraConfigError, match="rank"):
        QLoraLinear.from_quantized(q, 13, 4.0)


@pytest.mark.parametrize("kwargs, error", [
    (dict(rank=0), LoraConfigError),
    (dict(rank=25), LoraConfigError),
    (dict(alpha=-1.0), LoraConfigError),
    (dict(blocksize=48), LoraConfigError),
    (dict(double_quant=1), LoraTypeError),
    (dict(use_rslora="no"), LoraTypeError),
    (dict(weight=np.ones(80, np.float32)), LoraShapeError),
    (dict(weight=np.ones((24, 80), np.int64)), LoraDtypeError),
    (dict(weight=np.full((24, 80), np.nan, np.float32)), FloatingPointError),
])
def test_constructor_refuses(kwargs, error):
    args = dict(weight=np.ones((24, 80), np.float32), rank=4, alpha=8.0)
    args.update(kwargs)
    weight, rank, alpha = args.pop("weight"), args.pop("rank"), args.pop("alpha")
    with pytest.raises(error):
        QLoraLinear(weight, rank, alpha, **args)


def test_hostile_inputs(rng):
    _, layer = make(rng)
    with pytest.raises(LoraShapeError):
        layer.forward(np.zeros(79, np.float32))
    with pytest.raises(LoraShapeError):
        layer.forward_batch(np.zeros((2, 81), np.float32))
    with pytest.raises(LoraShapeError):
        layer(np.float32(1.0))
    with pytest.raises(LoraDtypeError):
        layer(np.zeros(80, complex))
    x = np.zeros(80, np.float32)
    for out, error in [(np.empty(24), LoraDtypeError), (np.empty(23, np.float32), LoraShapeError),
                       (np.empty(48, np.float32)[::2], LoraShapeError)]:
        with pytest.raises(error):
            layer.forward(x, out=out)
    shared = np.zeros(80, np.float32)
    with pytest.raises(LoraShapeError, match="overlap"):
        layer.forward_batch(shared.reshape(1, 80)[:, :80], out=shared[:24].reshape(1, 24))



@pytest.mark.parametrize("double_quant", [False, True])
def test_usual_out_overlapping_the_input_is_refused_untouched(rng, double_quant):
    # The forwards take a usual out (float32, C-contiguous, writable) without
    # Python's overlap checks; the kernels' guard must still refuse one that
    # shares memory with the input, before writing anything.
    _, layer = make(rng, 80, 80, double_quant=double_quant, blocksize=32)
    x = rng.standard_normal(80).astype(np.float32)
    X = rng.standard_normal((3, 80)).astype(np.float32)
    before = x.copy(), X.copy()
    for call, arg, out in [(layer.forward, x, x), (layer.forward_batch, X, X),
                           (layer.forward_batch, X[:2], X[1:])]:
        with pytest.raises(LoraShapeError, match="overlap"):
            call(arg, out=out)
    np.testing.assert_array_equal(x, before[0])
    np.testing.assert_array_equal(X, before[1])
    # The usual out and a converted input take different paths to one answer.
    y = layer.forward(x, out=np.empty(80, np.float32))
    np.testing.assert_array_equal(y, layer.forward(x.astype(np.float64)))
    np.testing.assert_array_equal(layer.forward_batch(X, out=np.empty((3, 80), np.float32)),
                                  layer.forward_batch(X.tolist()))

def test_forwards_in_threads_see_whole_factor_changes(rng):
    import threading

    _, layer = make(rng)
    x = rng.standard_normal(80).astype(np.float32)
    B1, B2 = layer.lora_b.copy(), rng.standard_normal((24, 4)).astype(np.float32)
    y1 = layer(x)
    layer.lora_b = B2
    y2 = layer(x)
    layer.lora_b = B1
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            seen.append(layer(x))

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(100):
        layer.lora_b = B2 if i % 2 == 0 else B1
    stop.set()
    for t in threads:
        t.join()
    assert seen
    assert all(np.array_equal(y, y1) or np.array_equal(y, y2) for y in seen)
