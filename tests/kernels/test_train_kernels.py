"""numba_lora.kernels.train: finite-difference gradients, references, user @njit, hostile input."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numba import njit, prange

import reference as ref
from numba_lora import LoraConfigError, LoraDtypeError, LoraShapeError, LoraTypeError
from numba_lora.kernels import train as K


# --------------------------------------------------------------------------
# References
def forward_ref(W, A, B, s, X, XL):
    W, A, B, X, XL = ref.f64(W, A, B, X, XL)
    H = XL @ A.T
    return X @ W.T + s * H @ B.T, H


def grads_ref(W, A, B, s, XL, H, dY, D=None):
    """(dX, dA, dB) in float64, D = mask * keep (None: no dropout)."""
    W, A, B, XL, H, dY = ref.f64(W, A, B, XL, H, dY)
    G = dY @ B
    lora = s * G @ A
    if D is not None:
        lora = lora * D
    return dY @ W + lora, s * G.T @ XL, s * dY.T @ H


def grads_magnitude(W, A, B, s, XL, H, dY):
    W, A, B, XL, H, dY = (np.abs(a) for a in ref.f64(W, A, B, XL, H, dY))
    G = dY @ B
    return dY @ W + abs(s) * G @ A, abs(s) * G.T @ XL, abs(s) * dY.T @ H


def problem(rng, batch, out_f=5, in_f=4, rank=2, dtype=np.float64):
    W, A, B = ref.random_lora(rng, out_f, in_f, rank, dtype)
    X = rng.standard_normal((batch, in_f)).astype(dtype)
    dY = rng.standard_normal((batch, out_f)).astype(dtype)
    return W, A, B, X, dY


def run(W, A, B, s, X, dY, mask=None, keep=1.0, beta=0.0, start=None):
    """forward_train + backward(_dropout) through the kernels: (Y, H, XL, dX, dA, dB)."""
    batch = X.shape[0]
    dtype = X.dtype
    XL = X
    if mask is not None:
        XL = np.empty_like(X)
        K.apply_dropout(X, mask, keep, XL)
    Y = np.empty((batch, W.shape[0]), dtype)
    H = np.empty((batch, A.shape[0]), dtype)
    K.forward_train(W, A, B, s, X, XL, Y, H)
    dX = np.empty_like(X)
    dA = np.zeros_like(A) if start is None else start[0].copy()
    dB = np.zeros_like(B) if start is None else start[1].copy()
    if mask is None:
        K.backward(W, A, B, s, XL, H, dY, dX, dA, dB, beta)
    else:
        K.backward_dropout(W, A, B, s, XL, H, dY, mask, keep, dX, dA, dB, beta)
    return Y, H, XL, dX, dA, dB


def loss(W, A, B, s, X, dY, mask, keep):
    XL = X if mask is None else X * (mask * keep)
    Y, _ = forward_ref(W, A, B, s, X, XL)
    return float(np.sum(Y * dY))


def central_difference(f, array, h=1e-6):
    grad = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        keep = array[index]
        array[index] = keep + h
        up = f()
        array[index] = keep - h
        down = f()
        array[index] = keep
        grad[index] = (up - down) / (2 * h)
    return grad


# --------------------------------------------------------------------------
# Gradients by finite differences (float64)
@pytest.mark.parametrize("batch", [0, 1, 5])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("scaling", [2.0, 8 / np.sqrt(3)], ids=["lora", "rslora"])
def test_gradients_match_finite_differences(rng, batch, dropout, scaling):
    W, A, B, X, dY = problem(rng, batch, rank=3)
    mask = (rng.random(X.shape) >= 0.3) if dropout else None
    keep = 1 / 0.7
    _, _, _, dX, dA, dB = run(W, A, B, scaling, X, dY, mask, keep)

    def f():
        return loss(W, A, B, scaling, X, dY, mask, keep)

    # The loss is bilinear in each argument: central differences are exact
    # up to rounding.
    np.testing.assert_allclose(dA, central_difference(f, A), rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(dB, central_difference(f, B), rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(dX, central_difference(f, X), rtol=1e-7, atol=1e-8)
    if batch == 0:
        assert not dA.any() and not dB.any() and dX.shape == (0, 4)


@pytest.mark.parametrize("dropout", [False, True])
def test_backward_matches_float64_reference(rng, dtype, dropout):
    W, A, B, X, dY = problem(rng, 6, out_f=9, in_f=7, rank=3, dtype=dtype)
    mask = (rng.random(X.shape) >= 0.25) if dropout else None
    keep = float(dtype(1) / dtype(0.75))
    Y, H, XL, dX, dA, dB = run(W, A, B, 1.5, X, dY, mask, keep)
    Yr, Hr = forward_ref(W, A, B, 1.5, X, XL)
    ref.assert_close(H, Hr, np.abs(XL.astype(np.float64)) @ np.abs(A.astype(np.float64)).T, dtype)
    ref.assert_close(Y, Yr, ref.forward(np.abs(W), np.abs(A), np.abs(B), 1.5, np.abs(X))[0]
                     if not dropout else np.abs(X) @ np.abs(W).T.astype(np.float64)
                     + 1.5 * np.abs(Hr) @ np.abs(B).T, dtype)
    D = None if mask is None else mask * np.float64(dtype(keep))
    expected = grads_ref(W, A, B, 1.5, XL, H, dY, D)
    for got, want, mag in zip((dX, dA, dB), expected, grads_magnitude(W, A, B, 1.5, XL, H, dY)):
        assert got.dtype == dtype
        ref.assert_close(got, want, mag, dtype)


def test_apply_dropout_is_x_times_mask_times_keep(dtype, rng):
    X = rng.standard_normal((4, 6)).astype(dtype)
    X[0, 0] = -2.0
    mask = rng.random(X.shape) >= 0.5
    mask[0, 0] = False
    out = np.empty_like(X)
    K.apply_dropout(X, mask, 1 / 0.6, out)
    ref.assert_bitwise_equal(out, X * (mask * dtype(1 / 0.6)).astype(dtype))
    assert np.signbit(out[0, 0])  # x * 0, as torch multiplies by its noise
    K.apply_dropout(X, mask, 1 / 0.6, X)  # in place
    ref.assert_bitwise_equal(X, out)


@pytest.mark.parametrize("dropout", [False, True])
def test_beta_one_accumulates_and_beta_zero_overwrites(rng, dtype, dropout):
    W, A, B, X, dY = problem(rng, 3, dtype=dtype)
    mask = (rng.random(X.shape) >= 0.3) if dropout else None
    fresh = run(W, A, B, 0.5, X, dY, mask, 2.0)
    start = (np.full_like(A, 3.0), np.full_like(B, -1.0))
    acc = run(W, A, B, 0.5, X, dY, mask, 2.0, beta=1.0, start=start)
    tol = dict(rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)
    np.testing.assert_allclose(acc[4], fresh[4] + 3.0, **tol)
    np.testing.assert_allclose(acc[5], fresh[5] - 1.0, **tol)
    # beta = 0 overwrites whatever was there, NaN included (as BLAS does).
    nan = (np.full_like(A, np.nan), np.full_like(B, np.nan))
    over = run(W, A, B, 0.5, X, dY, mask, 2.0, beta=0.0, start=nan)
    ref.assert_bitwise_equal(over[4], fresh[4])
    ref.assert_bitwise_equal(over[5], fresh[5])


def test_backward_factors_equals_backward_without_dx(rng, dtype):
    W, A, B, X, dY = problem(rng, 4, dtype=dtype)
    _, H, XL, _, dA, dB = run(W, A, B, 0.75, X, dY)
    dA2, dB2 = np.empty_like(A), np.empty_like(B)
    K.backward_factors(B, 0.75, XL, H, dY, dA2, dB2, 0.0)
    ref.assert_bitwise_equal(dA2, dA)
    ref.assert_bitwise_equal(dB2, dB)


def test_scaling_zero_gives_dense_gradient_and_no_factor_gradient(rng):
    W, A, B, X, dY = problem(rng, 3)
    Y, H, XL, dX, dA, dB = run(W, A, B, 0.0, X, dY, beta=1.0,
                               start=(np.ones_like(A), np.ones_like(B)))
    np.testing.assert_allclose(Y, X @ W.T, rtol=1e-14)
    np.testing.assert_allclose(dX, dY @ W, rtol=1e-14)
    assert (dA == 1).all() and (dB == 1).all()
    np.testing.assert_allclose(H, X @ A.T, rtol=1e-14)


@given(batch=st.integers(0, 7), out_f=st.integers(1, 9), in_f=st.integers(1, 9),
       rank=st.integers(1, 4), use_f32=st.booleans(), dropout=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_property_shapes_and_dtypes(batch, out_f, in_f, rank, use_f32, dropout, seed):
    dtype = np.float32 if use_f32 else np.float64
    rng = np.random.default_rng(seed)
    W, A, B, X, dY = problem(rng, batch, out_f, in_f, rank, dtype)
    mask = (rng.random(X.shape) >= 0.5) if dropout else None
    Y, H, XL, dX, dA, dB = run(W, A, B, 1.25, X, dY, mask, 2.0)
    assert Y.shape == (batch, out_f) and H.shape == (batch, rank)
    D = None if mask is None else mask * 2.0
    for got, want, mag in zip((dX, dA, dB), grads_ref(W, A, B, 1.25, XL, H, dY, D),
                              grads_magnitude(W, A, B, 1.25, XL, H, dY)):
        assert got.dtype == dtype
        ref.assert_close(got, want, mag, dtype)


# --------------------------------------------------------------------------
# User-style @njit callers
@njit
def user_train_step(W, A, B, s, X, dY):
    Y = np.empty((X.shape[0], W.shape[0]), dtype=W.dtype)
    H = np.empty((X.shape[0], A.shape[0]), dtype=W.dtype)
    K.forward_train(W, A, B, s, X, X, Y, H)
    dX = np.empty_like(X)
    dA = np.empty_like(A)
    dB = np.empty_like(B)
    K.backward(W, A, B, s, X, H, dY, dX, dA, dB, 0.0)
    return Y, dX, dA, dB


@njit
def user_dropout_step(W, A, B, s, X, mask, keep, dY):
    XL = np.empty_like(X)
    K.apply_dropout(X, mask, keep, XL)
    Y = np.empty((X.shape[0], W.shape[0]), dtype=W.dtype)
    H = np.empty((X.shape[0], A.shape[0]), dtype=W.dtype)
    K.forward_train(W, A, B, s, X, XL, Y, H)
    dX = np.empty_like(X)
    dA = np.zeros_like(A)
    dB = np.zeros_like(B)
    K.backward_dropout(W, A, B, s, XL, H, dY, mask, keep, dX, dA, dB, 1.0)
    K.backward_factors(B, s, XL, H, dY, dA, dB, 1.0)  # accumulates the same again
    return dX, dA, dB


@njit
def user_adamw(p, g, m, v, steps):
    for t in range(1, steps + 1):
        K.adamw_step(p, g, m, v, t, 1e-2, 0.9, 0.999, 1e-8, 1e-2)


@njit(parallel=True)
def user_adamw_many(ps, g, ms, vs):
    # The serial kernels are for a caller's own prange.
    for i in prange(ps.shape[0]):
        K.adamw_step_serial(ps[i], g, ms[i], vs[i], 1, 1e-2, 0.9, 0.999, 1e-8, 1e-2)


@njit
def user_sgd(p, g, buf):
    K.sgd_step(p, g, buf, 0.1, 0.9, 0.0, 0.0, 1, 1)
    K.sgd_step_serial(p, g, buf, 0.1, 0.9, 0.0, 0.0, 1, 0)


def test_train_step_from_user_njit(dtype, rng):
    W, A, B, X, dY = problem(rng, 4, dtype=dtype)
    Y, dX, dA, dB = user_train_step(W, A, B, 0.5, X, dY)
    expected = run(W, A, B, 0.5, X, dY)
    for got, want in zip((Y, dX, dA, dB), (expected[0],) + expected[3:]):
        assert got.dtype == dtype
        ref.assert_bitwise_equal(got, want)


def test_dropout_step_from_user_njit(dtype, rng):
    W, A, B, X, dY = problem(rng, 4, dtype=dtype)
    mask = rng.random(X.shape) >= 0.5
    dX, dA, dB = user_dropout_step(W, A, B, 0.5, X, mask, 2.0, dY)
    expected = run(W, A, B, 0.5, X, dY, mask, 2.0)
    ref.assert_bitwise_equal(dX, expected[3])
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(dA, 2 * expected[4], rtol=tol)
    np.testing.assert_allclose(dB, 2 * expected[5], rtol=tol)


def test_optimizers_from_user_njit(dtype, rng):
    p = rng.standard_normal((3, 5)).astype(dtype)
    g = rng.standard_normal((3, 5)).astype(dtype)
    m, v = np.zeros_like(p), np.zeros_like(p)
    expected = [p.copy(), m.copy(), v.copy()]
    for t in (1, 2):
        adamw_reference(*expected, g, t, 1e-2, 0.9, 0.999, 1e-8, 1e-2)
    user_adamw(p, g, m, v, 2)
    for got, want in zip((p, m, v), expected):
        ref.assert_bitwise_equal(got, want)
    ps = np.stack([p, 2 * p])
    ms, vs = np.zeros_like(ps), np.zeros_like(ps)
    user_adamw_many(ps, g, ms, vs)
    for i in range(2):
        want = [ps[i].copy() * 0 + (p if i == 0 else 2 * p), np.zeros_like(p), np.zeros_like(p)]
        adamw_reference(*want, g, 1, 1e-2, 0.9, 0.999, 1e-8, 1e-2)
        ref.assert_bitwise_equal(ps[i], want[0])
    buf = np.zeros_like(p)
    q = p.copy()
    user_sgd(q, g, buf)
    want_p, want_buf = p.copy(), np.zeros_like(p)
    sgd_reference(want_p, g, want_buf, 0.1, 0.9, 0.0, 0.0, True, True)
    sgd_reference(want_p, g, want_buf, 0.1, 0.9, 0.0, 0.0, True, False)
    ref.assert_bitwise_equal(q, want_p)
    ref.assert_bitwise_equal(buf, want_buf)


# --------------------------------------------------------------------------
# AdamW and SGD against torch's formulas, written out with C's fma
def _fma(a, b, c):
    a, b, c = np.broadcast_arrays(a, b, c)
    fn = ref._FMA[a.dtype]
    out = np.empty(a.shape, a.dtype)
    for index in np.ndindex(a.shape):
        out[index] = fn(a[index], b[index], c[index])
    return out


def adamw_reference(p, m, v, g, step, lr, beta1, beta2, eps, wd):
    """torch.optim.AdamW(foreach=False), one op at a time in p's dtype (constants in float64)."""
    t = p.dtype.type
    bc1 = 1 - beta1 ** float(step)
    bc2_sqrt = (1 - beta2 ** float(step)) ** 0.5
    step_size = lr / bc1
    if wd != 0:
        p[...] = p * t(1 - lr * wd)
    w = t(1 - beta1)
    if abs(w) < 0.5:
        m[...] = _fma(w, g - m, m)
    else:
        m[...] = _fma(w - t(1), g - m, g)
    v[...] = _fma(t(1 - beta2) * g, g, v * t(beta2))
    denom = np.sqrt(v) / t(bc2_sqrt) + t(eps)
    p[...] = p + (t(-step_size) * m) / denom


def sgd_reference(p, g, buf, lr, momentum, dampening, wd, nesterov, first):
    t = p.dtype.type
    d = g.copy()
    if wd != 0:
        d = _fma(p, t(wd), d)
    if momentum != 0:
        buf[...] = d if first else _fma(d, t(1 - dampening), buf * t(momentum))
        d = _fma(buf, t(momentum), d) if nesterov else buf.copy()
    p[...] = _fma(d, t(-lr), p)


@pytest.mark.parametrize("hyper", [
    (1e-3, 0.9, 0.999, 1e-8, 1e-2, 1.0),
    (3e-2, 0.6, 0.95, 1e-8, 0.1, 1e-8),     # tiny gradients: eps placement matters
    (1e-2, 0.2, 0.5, 1e-6, 0.0, 1.0),       # lerp weight >= 0.5: the other formula
])
def test_adamw_matches_torch_formula_bitwise(dtype, rng, hyper):
    lr, b1, b2, eps, wd, gscale = hyper
    p = rng.standard_normal((7, 9)).astype(dtype)
    m, v = np.zeros_like(p), np.zeros_like(p)
    want = [p.copy(), m.copy(), v.copy()]
    for step in range(1, 5):
        g = (gscale * rng.standard_normal(p.shape)).astype(dtype)
        K.adamw_step(p, g, m, v, step, lr, b1, b2, eps, wd)
        adamw_reference(*want, g, step, lr, b1, b2, eps, wd)
        for got, w in zip((p, m, v), want):
            ref.assert_bitwise_equal(got, w)


def test_adamw_is_close_to_float64_math(rng):
    # The float32 kernel against the textbook formula in float64.
    p = rng.standard_normal((4, 6)).astype(np.float32)
    g = rng.standard_normal((4, 6)).astype(np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    K.adamw_step(p32 := p.copy(), g, m, v, 1, 1e-2, 0.9, 0.999, 1e-8, 0.1)
    P, G = p.astype(np.float64), g.astype(np.float64)
    P = P * (1 - 1e-3)
    M, V = 0.1 * G, 0.001 * G * G
    P = P - 1e-2 / 0.1 * M / (np.sqrt(V) / np.sqrt(0.001) + 1e-8)
    np.testing.assert_allclose(p32, P, rtol=1e-6, atol=1e-7)


def test_adamw_serial_and_parallel_give_the_same_bits(dtype, rng):
    shape = (3, K.CHUNK + 5)  # more than one chunk
    p = rng.standard_normal(shape).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    a = [p.copy(), np.zeros_like(p), np.zeros_like(p)]
    b = [p.copy(), np.zeros_like(p), np.zeros_like(p)]
    for step in (1, 2):
        K.adamw_step(a[0], g, a[1], a[2], step, 1e-3, 0.9, 0.999, 1e-8, 1e-2)
        K.adamw_step_serial(b[0], g, b[1], b[2], step, 1e-3, 0.9, 0.999, 1e-8, 1e-2)
    for x, y in zip(a, b):
        ref.assert_bitwise_equal(x, y)


@pytest.mark.parametrize("hyper", [(0.1, 0.9, 0.0, 0.01, True), (0.05, 0.8, 0.1, 0.0, False),
                                   (0.1, 0.0, 0.0, 0.03, False)])
def test_sgd_matches_torch_formula_bitwise(dtype, rng, hyper):
    lr, mom, damp, wd, nesterov = hyper
    p = rng.standard_normal((5, 3)).astype(dtype)
    buf = np.zeros_like(p)
    want_p, want_buf = p.copy(), buf.copy()
    for step in range(3):
        g = rng.standard_normal(p.shape).astype(dtype)
        K.sgd_step(p, g, buf, lr, mom, damp, wd, int(nesterov), int(step == 0))
        sgd_reference(want_p, g, want_buf, lr, mom, damp, wd, nesterov, step == 0)
        ref.assert_bitwise_equal(p, want_p)
        ref.assert_bitwise_equal(buf, want_buf)


# --------------------------------------------------------------------------
# Hostile input: an error naming the problem, and every array untouched
def _snapshot(arrays):
    return [a.copy() for a in arrays]


def _unchanged(arrays, before):
    for a, b in zip(arrays, before):
        ref.assert_bitwise_equal(a, b)


def _train_arrays(rng, dtype=np.float64, batch=3):
    W, A, B, X, dY = problem(rng, batch, dtype=dtype)
    Y = np.full((batch, 5), 7.0, dtype)
    H = np.full((batch, 2), 7.0, dtype)
    dX = np.full_like(X, 7.0)
    dA = np.full_like(A, 7.0)
    dB = np.full_like(B, 7.0)
    return W, A, B, X, dY, Y, H, dX, dA, dB


@pytest.mark.parametrize("case", ["X_cols", "Y_rows", "H_rank", "XL_rows", "noncontig"])
def test_forward_train_refuses_bad_shapes(rng, case):
    W, A, B, X, dY, Y, H, dX, dA, dB = _train_arrays(rng)
    XL = X
    if case == "X_cols":
        X = XL = np.ones((3, 5))
    elif case == "Y_rows":
        Y = np.full((2, 5), 7.0)
    elif case == "H_rank":
        H = np.full((3, 3), 7.0)
    elif case == "XL_rows":
        XL = np.ones((2, 4))
    else:
        Y = np.full((5, 3), 7.0).T
    outs = [Y, H]
    before = _snapshot(outs)
    with pytest.raises(LoraShapeError):
        K.forward_train(W, A, B, 1.0, X, XL, Y, H)
    _unchanged(outs, before)


@pytest.mark.parametrize("case", ["dY_cols", "H_rows", "dX_shape", "dA_shape", "dB_shape",
                                  "mask_shape"])
def test_backward_refuses_bad_shapes(rng, case):
    W, A, B, X, dY, Y, H, dX, dA, dB = _train_arrays(rng)
    mask = np.ones(X.shape, bool)
    if case == "dY_cols":
        dY = np.ones((3, 4))
    elif case == "H_rows":
        H = np.ones((2, 2))
    elif case == "dX_shape":
        dX = np.full((3, 5), 7.0)
    elif case == "dA_shape":
        dA = np.full((3, 4), 7.0)
    elif case == "dB_shape":
        dB = np.full((5, 3), 7.0)
    else:
        mask = np.ones((2, 4), bool)
    outs = [dX, dA, dB]
    before = _snapshot(outs)
    with pytest.raises(LoraShapeError):
        K.backward_dropout(W, A, B, 1.0, X, H, dY, mask, 2.0, dX, dA, dB, 1.0)
    _unchanged(outs, before)
    if case != "mask_shape":
        with pytest.raises(LoraShapeError):
            K.backward(W, A, B, 1.0, X, H, dY, dX, dA, dB, 1.0)
        _unchanged(outs, before)
    if case not in ("mask_shape", "dX_shape"):
        with pytest.raises(LoraShapeError):
            K.backward_factors(B, 1.0, X, H, dY, dA, dB, 1.0)
        _unchanged(outs, before)


def test_mixed_dtypes_and_readonly_outputs_are_refused(rng):
    W, A, B, X, dY, Y, H, dX, dA, dB = _train_arrays(rng)
    before = _snapshot([Y, H, dX, dA, dB])
    with pytest.raises(LoraDtypeError, match="forward_train"):
        K.forward_train(W, A, B, 1.0, X.astype(np.float32), X, Y, H)
    with pytest.raises(LoraDtypeError, match="backward"):
        K.backward(W, A, B, 1.0, X, H, dY, dX, dA.astype(np.float32), dB, 0.0)
    ro = dA.copy()
    ro.flags.writeable = False
    with pytest.raises(LoraTypeError, match="dA"):
        K.backward(W, A, B, 1.0, X, H, dY, dX, ro, dB, 0.0)
    with pytest.raises(LoraDtypeError, match="mask"):
        K.backward_dropout(W, A, B, 1.0, X, H, dY, np.ones(X.shape), 2.0, dX, dA, dB, 0.0)
    with pytest.raises(LoraTypeError):
        K.backward(W, A, B, 1.0, X, H, dY, dX, dA, dB, None)
    _unchanged([Y, H, dX, dA, dB], before)


@pytest.mark.parametrize("keep", [0.5, np.nan, np.inf, -2.0])
def test_dropout_keep_scale_out_of_range(rng, keep):
    W, A, B, X, dY, Y, H, dX, dA, dB = _train_arrays(rng)
    mask = np.ones(X.shape, bool)
    out = np.full_like(X, 7.0)
    before = _snapshot([out, dX, dA, dB])
    with pytest.raises(LoraConfigError, match="keep_scale"):
        K.apply_dropout(X, mask, keep, out)
    with pytest.raises(LoraConfigError, match="keep_scale"):
        K.backward_dropout(W, A, B, 1.0, X, H, dY, mask, keep, dX, dA, dB, 0.0)
    _unchanged([out, dX, dA, dB], before)


@pytest.mark.parametrize("bad", [
    dict(lr=np.nan), dict(lr=-1.0), dict(lr=np.inf), dict(beta1=1.0), dict(beta2=-0.1),
    dict(beta1=np.nan), dict(eps=np.nan), dict(eps=-1.0), dict(weight_decay=np.nan),
    dict(step=0),
])
def test_adamw_refuses_bad_hyperparameters(rng, bad):
    kw = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
    kw.update(bad)
    p = rng.standard_normal((2, 3))
    arrays = [p, np.zeros_like(p), np.zeros_like(p)]
    before = _snapshot(arrays)
    for kernel in (K.adamw_step, K.adamw_step_serial):
        with pytest.raises(LoraConfigError):
            kernel(p, np.ones_like(p), arrays[1], arrays[2], kw["step"], kw["lr"], kw["beta1"],
                   kw["beta2"], kw["eps"], kw["weight_decay"])
    _unchanged(arrays, before)


def test_optimizer_kernels_refuse_bad_arrays(rng):
    p = rng.standard_normal((2, 3))
    m, v = np.zeros_like(p), np.zeros_like(p)
    before = _snapshot([p, m, v])
    with pytest.raises(LoraShapeError):
        K.adamw_step(p, np.ones((3, 2)), m, v, 1, 1e-3, 0.9, 0.999, 1e-8, 0.0)
    with pytest.raises(LoraShapeError):
        K.adamw_step(p, np.ones((2, 6))[:, ::2], m, v, 1, 1e-3, 0.9, 0.999, 1e-8, 0.0)
    with pytest.raises(LoraDtypeError):
        K.adamw_step(p, np.ones((2, 3), np.float32), m, v, 1, 1e-3, 0.9, 0.999, 1e-8, 0.0)
    with pytest.raises(LoraTypeError):
        K.adamw_step(p, np.ones((2, 3)), m, v, 1.5, 1e-3, 0.9, 0.999, 1e-8, 0.0)
    ro = p.copy()
    ro.flags.writeable = False
    with pytest.raises(LoraTypeError, match="param"):
        K.adamw_step(ro, np.ones((2, 3)), m, v, 1, 1e-3, 0.9, 0.999, 1e-8, 0.0)
    with pytest.raises(LoraShapeError):
        K.sgd_step(p, np.ones((2, 3)), np.zeros((3, 3)), 0.1, 0.9, 0.0, 0.0, 0, 1)
    with pytest.raises(LoraConfigError):
        K.sgd_step(p, np.ones((2, 3)), m, np.nan, 0.9, 0.0, 0.0, 0, 1)
    with pytest.raises(LoraConfigError, match="nesterov"):
        K.sgd_step(p, np.ones((2, 3)), m, 0.1, 0.0, 0.0, 0.0, 1, 1)
    _unchanged([p, m, v], before)


def test_apply_dropout_refuses_a_partial_overlap(rng):
    # In place (out is X) is allowed; an out shifted against X is not.
    from numba_lora import LoraShapeError

    buf = rng.standard_normal(13)
    X, out = buf[:12].reshape(3, 4), buf[1:13].reshape(3, 4)
    before = buf.copy()
    with pytest.raises(LoraShapeError, match="out must not overlap X .it may be X itself"):
        K.apply_dropout(X, np.ones((3, 4), bool), 2.0, out)
    np.testing.assert_array_equal(buf, before)
