"""Training against torch and PEFT: the fixtures in tests/fixtures/train/.

The fixtures were made by real torch autograd, ``torch.optim.AdamW``,
``clip_grad_norm_`` and a PEFT training run (see the README there).  These
tests read the npz files only, so they run without torch; one optional test
at the end loads numba_lora's saved adapter in PEFT itself.

First the fixtures are checked against float64 NumPy references (so a
wrong fixture cannot pass silently), then numba_lora's training API is
compared with them.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from reference import _FMA

import numba_lora
from numba_lora import LoraAdapter

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "train"
DTYPE_NAMES = ("float32", "float64")
GRAD_CASES = ("plain", "rank1_batch1", "batch0", "dropout", "rslora", "rslora_dropout_batch1")
#: Relative to the largest magnitude of the array compared (the brief's "array's scale").
SCALE_RTOL = {"float32": 1e-5, "float64": 1e-10}


def load(name):
    with np.load(FIXTURES / name) as data:
        return {k: data[k] for k in data.files}


def assert_scaled(actual, expected, rtol, what=""):
    """Every element within ``rtol`` times the largest |expected| (or 1 ulp-ish when all zero)."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    if expected.size == 0:
        return
    scale = float(np.abs(expected.astype(np.float64)).max())
    err = float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max())
    assert err <= rtol * scale + np.finfo(np.float64).tiny, (
        f"{what}: worst error {err:.3e} against scale {scale:.3e} (rtol {rtol:g})")


# ----------------------------------------------------- float64 references
def grads_reference(X, W, A, B, s, mask, p, dY):
    """(Y, H, dX, dA, dB) in float64 for Y = X W^T + s (Xl A^T) B^T, Xl = X * mask / (1 - p)."""
    X, W, A, B, dY = (np.asarray(a, dtype=np.float64) for a in (X, W, A, B, dY))
    keep = mask.astype(np.float64) / (1.0 - p)
    Xl = X * keep
    H = Xl @ A.T
    Y = X @ W.T + s * (H @ B.T)
    dYB = dY @ B
    return Y, H, dY @ W + s * (dYB @ A) * keep, s * dYB.T @ Xl, s * dY.T @ H


def _fma(a, b, c):
    a, b, c = np.broadcast_arrays(*(np.asarray(v) for v in (a, b, c)))
    fn = _FMA[a.dtype]
    out = np.empty_like(a)
    for i in np.ndindex(a.shape):
        out[i] = fn(a[i], b[i], c[i])
    return out


def torch_adamw_step(p, m, v, g, t, lr, b1, b2, eps, wd, scalar_loop=False):
    """One torch 2.13 single-tensor AdamW step on CPU, bit for bit (see the fixture README).

    ``scalar_loop``: float32 tensors below the SIMD width round the last
    product differently; float32 SIMD loops differ only where torch's
    AVX-512 square root is not correctly rounded.
    """
    c = p.dtype.type
    p = p * c(1.0 - lr * wd)
    m = _fma(c(1.0 - b1), g - m, m)                       # m.lerp_(g, 1 - b1)
    v = _fma(c(1.0 - b2) * g, g, v * c(b2))               # v.mul_(b2).addcmul_(g, g, 1 - b2)
    bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
    denom = np.sqrt(v) / c(np.sqrt(bc2)) + c(eps)
    step = c(-lr / bc1)
    if scalar_loop and p.dtype == np.float32:
        return p + step * (m / denom), m, v
    return p + (step * m) / denom, m, v


def adamw_reference64(p, m, v, g, t, lr, b1, b2, eps, wd):
    """The same step in float64 from the float values given, and each result's term magnitude.

    Returns ``(p, m, v), (|p|, |m|, |v|)`` where the magnitudes bound the sum
    of the absolute values of the terms (rounding errors scale with them).
    """
    p, m, v, g = (np.asarray(a, dtype=np.float64) for a in (p, m, v, g))
    p_mag = np.abs(p)
    m_mag = np.abs(m) + (1.0 - b1) * np.abs(g)
    m = m + (1.0 - b1) * (g - m)
    v = b2 * v + (1.0 - b2) * g * g
    denom = np.sqrt(v) / np.sqrt(1.0 - b2 ** t) + eps
    update = lr / (1.0 - b1 ** t) * m / denom
    p = p * (1.0 - lr * wd) - update
    return (p, m, v), (p_mag + np.abs(update), m_mag, v)


def adamw_cases(dtype_name, stem="adamw"):
    """[(case, {key: array} without the case prefix, hyper-parameters)] of one fixture file."""
    data = load(f"{stem}_{dtype_name}.npz")
    out = []
    for case in data["cases"]:
        case = str(case)
        get = {k.split(".", 1)[1]: v for k, v in data.items() if k.startswith(case + ".")}
        get["_tensors"] = [str(n) for n in data["tensors"]]
        get["cpu_capability"] = data.get("cpu_capability")
        hyper = dict(b1=float(get["beta1"]), b2=float(get["beta2"]), eps=float(get["eps"]),
                     wd=float(get["weight_decay"]))
        out.append((case, get, hyper))
    return out


def mlp_reference(data, factors, X=None):
    """The PEFT model's forward in float64: (hidden pre-activation, hidden, output)."""
    s = float(data["scaling"])
    X = np.asarray(data["X"] if X is None else X, dtype=np.float64)
    f = {k: np.asarray(v, dtype=np.float64) for k, v in factors.items()}
    W1, b1, W2, b2 = (np.asarray(data[k], dtype=np.float64)
                      for k in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"))
    Z = X @ W1.T + s * (X @ f["fc1.A"].T) @ f["fc1.B"].T + b1
    Hd = np.maximum(Z, 0.0)
    return Z, Hd, Hd @ W2.T + s * (Hd @ f["fc2.A"].T) @ f["fc2.B"].T + b2


def factors_at(data, suffix):
    return {f"{layer}.{ab}": data[f"{layer}.{ab}{suffix}"]
            for layer in ("fc1", "fc2") for ab in "AB"}


# ------------------------------------------- the fixtures are what they say
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("case", GRAD_CASES)
def test_grad_fixture_matches_float64_reference(dtype_name, case):
    d = load(f"grads_{dtype_name}_{case}.npz")
    assert str(d["torch_version"]).startswith("2.13.0")
    assert d["X"].dtype == np.dtype(dtype_name) and d["mask"].dtype == np.bool_
    s = float(d["scaling"])
    expect_s = float(d["alpha"]) / (np.sqrt(d["rank"]) if d["use_rslora"] else d["rank"])
    assert s == expect_s
    Y, H, dX, dA, dB = grads_reference(d["X"], d["W"], d["A"], d["B"], s, d["mask"],
                                       float(d["p"]), d["dY"])
    rtol = SCALE_RTOL[dtype_name] if dtype_name == "float64" else 1e-5
    for name, ref in (("Y", Y), ("H", H), ("dX", dX), ("dA", dA), ("dB", dB)):
        assert_scaled(d[name], ref, rtol, f"{case} {name}")


def replay(cases, step_fn):
    """Run ``step_fn`` over every case and tensor, each step from torch's previous state.

    Yields (label, ours, torch's) for param, exp_avg and exp_avg_sq of each step.
    """
    for case, get, hyper in cases:
        for i, name in enumerate(get["_tensors"]):
            p = get[f"{name}.param0"]
            m = np.zeros_like(p)
            v = np.zeros_like(p)
            for t in range(int(get["steps"])):
                ours = step_fn(p, m, v, get[f"{name}.grad"][t], t + 1, float(get["lr"][i]), hyper)
                for what, arr in zip(("param", "exp_avg", "exp_avg_sq"), ours):
                    yield f"{case} {name}.{what} step {t + 1}", arr, get[f"{name}.{what}"][t]
                p, m, v = (get[f"{name}.{w}"][t].copy() for w in ("param", "exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_adamw_fixture_is_torch_single_tensor_order_bitwise(dtype_name):
    """The README's per-element order reproduces every torch bit of the small tensors."""
    cases = [c for c in adamw_cases(dtype_name)
             if not (c[0] == "default_fused" and dtype_name == "float64")]
    for label, ours, theirs in replay(cases, lambda p, m, v, g, t, lr, h: torch_adamw_step(
            p, m, v, g, t, lr, **h, scalar_loop=True)):
        np.testing.assert_array_equal(ours, theirs, err_msg=label)


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_adamw_wide_fixture_bitwise_but_float32_sqrt(dtype_name):
    """SIMD loops: every bit in float64; in float32 a few parameters differ, as torch's sqrt."""
    cases = adamw_cases(dtype_name, "adamw_wide")
    assert str(cases[0][1]["cpu_capability"]) == "AVX512"

    def step(p, m, v, g, t, lr, h):
        ours = torch_adamw_step(p, m, v, g, t, lr, **h)
        # One ulp of sqrt moves the update by about one rounding of its size.
        return zip(ours, adamw_reference64(p, m, v, g, t, lr, **h)[1])

    differ = 0
    for label, (ours, mag), theirs in replay(cases, step):
        if dtype_name == "float64" or "param" not in label:
            np.testing.assert_array_equal(ours, theirs, err_msg=label)
        else:
            off = ours != theirs
            assert (np.abs(ours - theirs) <= 2 * np.finfo(np.float32).eps * mag).all(), label
            differ += int(np.count_nonzero(off))
    assert differ <= (4 if dtype_name == "float32" else 0)


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_adamw_fixture_matches_float64_formula(dtype_name):
    eps = np.finfo(np.dtype(dtype_name)).eps
    for stem in ("adamw", "adamw_wide"):
        cases = adamw_cases(dtype_name, stem)
        for case, get, _ in cases:
            assert str(get["implementation"]) in ("single_tensor", "foreach", "fused"), case
        for label, (ref, mag), theirs in replay(cases, lambda p, m, v, g, t, lr, h: zip(
                *adamw_reference64(p, m, v, g, t, lr, **h))):
            err = np.abs(theirs - ref)
            assert (err <= 4 * eps * mag).all(), f"{label}: worst {err.max():.3e}"


def clip_reference(grads, max_norm):
    total = np.sqrt(sum(float(np.sum(np.asarray(g, dtype=np.float64) ** 2)) for g in grads))
    coef = min(max_norm / (total + 1e-6), 1.0)
    return total, [np.asarray(g, dtype=np.float64) * coef for g in grads]


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_clip_fixture_matches_float64_reference(dtype_name):
    d = load(f"clip_{dtype_name}.npz")
    for case in map(str, d["cases"]):
        grads = [d[f"{case}.grad{i}"] for i in range(int(d["count"]))]
        total, clipped = clip_reference(grads, float(d[f"{case}.max_norm"]))
        np.testing.assert_allclose(d[f"{case}.total_norm"], total, rtol=1e-6)
        for i, ref in enumerate(clipped):
            assert_scaled(d[f"{case}.clipped{i}"], ref, 1e-6, f"{case} clipped{i}")


@pytest.mark.parametrize("name", ["mlp_default_float32", "mlp_default_float64",
                                  "mlp_nonzero_b_float32", "mlp_loraplus_clip_float32"])
def test_mlp_fixture_matches_float64_reference(name):
    d = load(f"{name}.npz")
    rtol = 1e-5 if name.endswith("float32") else 1e-10
    # The first loss and gradients from the initial factors.
    Z, Hd, out = mlp_reference(d, factors_at(d, "0"))
    T = d["T"].astype(np.float64)
    n = T.size
    np.testing.assert_allclose(d["loss"][0], np.mean((out - T) ** 2), rtol=rtol)
    s = float(d["scaling"])
    dOut = 2.0 * (out - T) / n
    X = d["X"].astype(np.float64)
    A2, B2, A1, B1 = (d[k].astype(np.float64) for k in ("fc2.A0", "fc2.B0", "fc1.A0", "fc1.B0"))
    dHd = dOut @ d["fc2_weight"].astype(np.float64) + s * (dOut @ B2) @ A2
    dZ = dHd * (Z > 0)
    grads = {"fc2.dA0": s * (dOut @ B2).T @ Hd, "fc2.dB0": s * dOut.T @ (Hd @ A2.T),
             "fc1.dA0": s * (dZ @ B1).T @ X, "fc1.dB0": s * dZ.T @ (X @ A1.T)}
    for key, ref in grads.items():
        assert_scaled(d[key], ref, rtol, f"{name} {key}")
    # After training: the saved output is the final factors' forward; the loss fell.
    _, _, final = mlp_reference(d, factors_at(d, ""))
    assert_scaled(d["final_output"], final, rtol, f"{name} final_output")
    assert d["loss"].shape == (int(d["steps"]),)
    assert d["final_loss"] < 0.25 * d["loss"][0]
    assert str(d["implementation"]) == "single_tensor"
    assert json.loads(str(d["optimizer"]))["lr"] == float(d["lr"])


def mlp_forward_with_adapter(adapter, d, X):
    """The MLP's forward through numba_lora's layers (biases added here, as PEFT's base layers)."""
    Hd = np.maximum(adapter.forward_batch_layer("fc1", X) + d["fc1_bias"], 0)
    Hd = np.ascontiguousarray(Hd, dtype=X.dtype)
    return adapter.forward_batch_layer("fc2", Hd) + d["fc2_bias"]


def test_peft_trained_adapter_loads_and_reproduces_peft_output():
    d = load("mlp_default_float32.npz")
    base = {"fc1": d["fc1_weight"], "fc2": d["fc2_weight"]}
    adapter = LoraAdapter.from_peft(FIXTURES / "peft_adapter", base)
    assert sorted(adapter) == ["fc1", "fc2"]
    for layer in ("fc1", "fc2"):
        np.testing.assert_array_equal(adapter[layer].lora_a, d[f"{layer}.A"])
        np.testing.assert_array_equal(adapter[layer].lora_b, d[f"{layer}.B"])
        assert adapter[layer].scaling == float(d["scaling"])
    assert_scaled(mlp_forward_with_adapter(adapter, d, d["X"]), d["final_output"], 1e-5,
                  "PEFT output")


# ------------------------------------------------ numba_lora's kernels vs torch
def train_kernels():
    return pytest.importorskip("numba_lora.kernels.train")


def kernel_grads(k, d, *, factors_only=False, beta=0.0, dA=None, dB=None):
    """forward_train + backward (or backward_dropout / backward_factors) on fixture ``d``."""
    X, W, A, B, dY = d["X"], d["W"], d["A"], d["B"], d["dY"]
    dtype = X.dtype
    s, p = float(d["scaling"]), float(d["p"])
    batch, rank = X.shape[0], A.shape[0]
    if p > 0:
        XL = k.apply_dropout(X, d["mask"], 1.0 / (1.0 - p), np.empty_like(X))
    else:
        XL = X
    Y = np.full((batch, W.shape[0]), np.nan, dtype)
    H = np.full((batch, rank), np.nan, dtype)
    k.forward_train(W, A, B, s, X, XL, Y, H)
    dX = np.full_like(X, np.nan)
    # beta = 0 overwrites whatever the gradients held, NaN included.
    dA = np.full_like(A, np.nan) if dA is None else dA
    dB = np.full_like(B, np.nan) if dB is None else dB
    if factors_only:
        k.backward_factors(B, s, XL, H, dY, dA, dB, beta)
        dX = None
    elif p > 0:
        k.backward_dropout(W, A, B, s, XL, H, dY, d["mask"], 1.0 / (1.0 - p), dX, dA, dB, beta)
    else:
        k.backward(W, A, B, s, XL, H, dY, dX, dA, dB, beta)
    return dict(Xl=XL, Y=Y, H=H, dX=dX, dA=dA, dB=dB)


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("case", GRAD_CASES)
def test_kernel_gradients_equal_torch_autograd(dtype_name, case):
    k = train_kernels()
    d = load(f"grads_{dtype_name}_{case}.npz")
    got = kernel_grads(k, d)
    for name in ("Xl", "Y", "H", "dX", "dA", "dB"):
        assert got[name].dtype == np.dtype(dtype_name)
        assert_scaled(got[name], d[name], SCALE_RTOL[dtype_name], f"{case} {name}")
    # Without dX (the first adapted layer): the same factor gradients.
    factors = kernel_grads(k, d, factors_only=True)
    for name in ("dA", "dB"):
        assert_scaled(factors[name], d[name], SCALE_RTOL[dtype_name], f"{case} {name} (no dX)")


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_kernel_gradients_accumulate_over_micro_batches(dtype_name):
    """beta = 1 over the two halves of a batch gives the whole batch's gradients."""
    k = train_kernels()
    d = load(f"grads_{dtype_name}_dropout.npz")
    dA = np.zeros_like(d["A"])
    dB = np.zeros_like(d["B"])
    for rows in (slice(0, 2), slice(2, None)):
        part = dict(d, X=np.ascontiguousarray(d["X"][rows]), dY=np.ascontiguousarray(d["dY"][rows]),
                    mask=np.ascontiguousarray(d["mask"][rows]))
        kernel_grads(k, part, beta=1.0, dA=dA, dB=dB)
    assert_scaled(dA, d["dA"], SCALE_RTOL[dtype_name], "dA")
    assert_scaled(dB, d["dB"], SCALE_RTOL[dtype_name], "dB")


def kernel_adamw_step(k):
    """A ``replay`` step: numba_lora's adamw_step on copies, with the float64 magnitudes."""
    def step(p, m, v, g, t, lr, h):
        mags = adamw_reference64(p, m, v, g, t, lr, **h)[1]
        p, m, v = p.copy(), m.copy(), v.copy()
        k.adamw_step(p, g, m, v, t, lr, h["b1"], h["b2"], h["eps"], h["wd"])
        return zip((p, m, v), mags)
    return step


@pytest.mark.parametrize("stem", ["adamw", "adamw_wide"])
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_kernel_adamw_equals_torch_step_for_step(dtype_name, stem):
    """float64: every bit, step by step.  float32: a few values one rounding apart.

    In float32 torch's scalar loop (tensors below the SIMD width) rounds the
    last product as ``step * (m / d)``, and its AVX-512 sqrt is not always
    correctly rounded (fixture README); the kernel rounds as torch's SIMD
    loop, with a correctly rounded sqrt.
    """
    k = train_kernels()
    cases = adamw_cases(dtype_name, stem)
    differ = total = 0
    for label, (ours, mag), theirs in replay(cases, kernel_adamw_step(k)):
        total += ours.size
        if dtype_name == "float64" and not label.startswith("default_fused"):
            np.testing.assert_array_equal(ours, theirs, err_msg=label)
            continue
        # Fused float64 and every float32 value: within two roundings of the terms' size.
        assert (np.abs(ours - theirs) <= 2 * np.finfo(ours.dtype).eps * mag).all(), label
        differ += int(np.count_nonzero(ours != theirs))
    print(f"adamw {stem} {dtype_name}: {differ} of {total} values differ from torch's bits")
    if dtype_name == "float32":
        assert differ <= 0.01 * total, (differ, total)


def kernel_mlp_run(k, d, steps=None):
    """The fixture's PEFT run, redone with numba_lora's kernels: (losses, factors)."""
    dtype = d["X"].dtype
    X, T = d["X"], d["T"]
    s, lr = float(d["scaling"]), float(d["lr"])
    W1, b1, W2, b2 = d["fc1_weight"], d["fc1_bias"], d["fc2_weight"], d["fc2_bias"]
    f = {key: v.copy() for key, v in factors_at(d, "0").items()}
    state = {key: (np.zeros_like(v), np.zeros_like(v), np.empty_like(v)) for key, v in f.items()}
    n = X.shape[0]
    Z = np.empty((n, W1.shape[0]), dtype)
    H1 = np.empty((n, f["fc1.A"].shape[0]), dtype)
    Out = np.empty((n, W2.shape[0]), dtype)
    H2 = np.empty((n, f["fc2.A"].shape[0]), dtype)
    dHd = np.empty_like(Z)
    losses = []
    for t in range(1, int(d["steps"] if steps is None else steps) + 1):
        k.forward_train(W1, f["fc1.A"], f["fc1.B"], s, X, X, Z, H1)
        Z += b1
        Hd = np.maximum(Z, dtype.type(0))
        k.forward_train(W2, f["fc2.A"], f["fc2.B"], s, Hd, Hd, Out, H2)
        Out += b2
        diff = Out - T
        losses.append(float(np.mean(diff * diff)))
        dOut = diff * dtype.type(2.0 / diff.size)      # d mean((out - T)^2) / d out
        g = {key: st[2] for key, st in state.items()}
        k.backward(W2, f["fc2.A"], f["fc2.B"], s, Hd, H2, dOut, dHd, g["fc2.A"], g["fc2.B"], 0.0)
        dZ = dHd * (Z > 0)
        # The first adapted layer: no input gradient needed.
        k.backward_factors(f["fc1.B"], s, X, H1, dZ, g["fc1.A"], g["fc1.B"], 0.0)
        for key, (m, v, grad) in state.items():
            k.adamw_step(f[key], grad, m, v, t, lr, 0.9, 0.999, 1e-8, 1e-2)
    return np.array(losses), f


@pytest.mark.parametrize("name", ["mlp_default_float32", "mlp_default_float64",
                                  "mlp_nonzero_b_float32"])
def test_kernel_training_run_equals_peft(name):
    """PEFT's 20-step AdamW run redone: the same loss curve (1e-4 relative in float32)."""
    k = train_kernels()
    d = load(f"{name}.npz")
    opt = json.loads(str(d["optimizer"]))
    assert (opt["betas"], opt["eps"], opt["weight_decay"]) == ([0.9, 0.999], 1e-8, 1e-2)
    losses, factors = kernel_mlp_run(k, d)
    rtol = 1e-4 if name.endswith("float32") else 1e-10
    np.testing.assert_allclose(losses, d["loss"], rtol=rtol, atol=0)
    for key, value in factors.items():
        assert_scaled(value, d[key], 10 * rtol, key)
    print(f"{name}: worst loss deviation {np.max(np.abs(losses / d['loss'] - 1)):.2e} relative")


# -------------------------------------------- numba_lora's layer API vs torch
def optim():
    return pytest.importorskip("numba_lora.optim")


def fixture_layer(d):
    """A LoraLinear holding the fixture's W, A, B (and its scaling)."""
    layer = numba_lora.LoraLinear(d["W"], int(d["rank"]), float(d["alpha"]),
                                  use_rslora=bool(d.get("use_rslora", False)))
    layer.lora_a = d["A"]
    layer.lora_b = d["B"]
    assert layer.scaling == float(d["scaling"])
    return layer


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("case", GRAD_CASES)
def test_layer_gradients_equal_torch_autograd(dtype_name, case):
    """forward_train / backward of a LoraLinear against torch (dropout: on the layer's own mask)."""
    optim()
    d = load(f"grads_{dtype_name}_{case}.npz")
    layer = fixture_layer(d)
    p = float(d["p"])
    Y, ctx = layer.forward_train(d["X"], dropout=p, rng=np.random.default_rng(5))
    dX = layer.backward(d["dY"], ctx)
    rtol = SCALE_RTOL[dtype_name]
    if p == 0 or d["X"].shape[0] == 0:
        expected = d
    else:
        # The layer draws its own mask: the torch-made mask was checked at
        # kernel level above; here the float64 reference on the layer's mask.
        assert ctx.mask.shape == d["X"].shape and ctx.mask.dtype == np.bool_
        Yr, Hr, dXr, dAr, dBr = grads_reference(d["X"], d["W"], d["A"], d["B"],
                                                float(d["scaling"]), ctx.mask, p, d["dY"])
        expected = dict(Y=Yr, dX=dXr, dA=dAr, dB=dBr)
    assert_scaled(Y, expected["Y"], rtol, "Y")
    assert_scaled(dX, expected["dX"], rtol, "dX")
    assert_scaled(layer.grad_a, expected["dA"], rtol, "grad_a")
    assert_scaled(layer.grad_b, expected["dB"], rtol, "grad_b")
    # A second backward accumulates (gradient accumulation), zero_grad forgets.
    layer.backward(d["dY"], ctx, input_grad=False)
    assert_scaled(layer.grad_a, 2 * np.asarray(expected["dA"], np.float64), rtol, "2 grad_a")
    layer.zero_grad()
    assert layer.grad_a is None and layer.grad_b is None


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_clip_grad_norm_equals_torch(dtype_name):
    """Gradients of two layers from a backward, then clip_grad_norm as torch's clip_grad_norm_."""
    o = optim()
    d = load(f"clip_layers_{dtype_name}.npz")
    rtol = SCALE_RTOL[dtype_name]
    for case in map(str, d["cases"]):
        layers = []
        for i in range(int(d["count"])):
            get = {k.split(".", 1)[1]: v for k, v in d.items() if k.startswith(f"layer{i}.")}
            get["rank"] = get["A"].shape[0]
            layer = fixture_layer(get)
            _, ctx = layer.forward_train(get["X"])
            layer.backward(get["dY"], ctx, input_grad=False)
            assert_scaled(layer.grad_a, d[f"{case}.layer{i}.grad_a"], rtol, f"{case} grad_a")
            assert_scaled(layer.grad_b, d[f"{case}.layer{i}.grad_b"], rtol, f"{case} grad_b")
            layers.append(layer)
        total = o.clip_grad_norm(layers, float(d[f"{case}.max_norm"]))
        np.testing.assert_allclose(total, d[f"{case}.total_norm"], rtol=rtol)
        for i, layer in enumerate(layers):
            assert_scaled(layer.grad_a, d[f"{case}.layer{i}.clipped_a"], rtol, f"{case} clipped_a")
            assert_scaled(layer.grad_b, d[f"{case}.layer{i}.clipped_b"], rtol, f"{case} clipped_b")


def mlp_adapter(d, config=None):
    """A LoraAdapter over the fixture MLP's two weights, holding the initial factors."""
    config = config or numba_lora.LoraConfig(r=int(d["rank"]), lora_alpha=float(d["alpha"]),
                                             target_modules=["fc1", "fc2"])
    adapter = LoraAdapter(config)
    for name in ("fc1", "fc2"):
        layer = adapter.add_layer(name, d[f"{name}_weight"])
        layer.lora_a = d[f"{name}.A0"]
        layer.lora_b = d[f"{name}.B0"]
    return adapter


def fixture_adamw(d, adapter):
    """numba_lora's AdamW with the fixture run's settings (LoRA+ ratio included)."""
    opt = json.loads(str(d["optimizer"]))
    return optim().AdamW(adapter, lr=float(d["lr"]), betas=tuple(opt["betas"]), eps=opt["eps"],
                         weight_decay=opt["weight_decay"], lr_b_ratio=float(d["lr_b_ratio"]))


def train_mlp_with_api(adapter, d, steps, norms=None):
    """PEFT's run through the public training API: the loss before each step.

    With a finite ``max_norm`` in the fixture, the gradients are clipped
    before each step and the total norms appended to ``norms``.
    """
    o = optim()
    opt = fixture_adamw(d, adapter)
    max_norm = float(d["max_norm"])
    fc1, fc2 = adapter["fc1"], adapter["fc2"]
    X, T = d["X"], d["T"]
    losses = []
    for _ in range(steps):
        Z, ctx1 = fc1.forward_train(X)
        Z += d["fc1_bias"]
        Hd = np.maximum(Z, 0)
        Out, ctx2 = fc2.forward_train(Hd)
        Out += d["fc2_bias"]
        diff = Out - T
        losses.append(float(np.mean(diff * diff)))
        dHd = fc2.backward(diff * X.dtype.type(2.0 / diff.size), ctx2)
        fc1.backward(dHd * (Z > 0), ctx1, input_grad=False)
        if np.isfinite(max_norm):
            total = o.clip_grad_norm(adapter, max_norm)
            if norms is not None:
                norms.append(total)
        opt.step()
        opt.zero_grad()
    return np.array(losses), opt


@pytest.mark.parametrize("name", ["mlp_default_float32", "mlp_default_float64",
                                  "mlp_nonzero_b_float32", "mlp_loraplus_clip_float32"])
def test_api_training_run_equals_peft(name):
    """LoraAdapter + AdamW + forward_train/backward: PEFT's loss curve and final factors.

    ``mlp_loraplus_clip``: B in a param group at 16 times A's lr (LoRA+),
    other betas and weight decay, and clip_grad_norm_ before every step.
    """
    d = load(f"{name}.npz")
    adapter = mlp_adapter(d)
    norms = []
    losses, _ = train_mlp_with_api(adapter, d, int(d["steps"]), norms)
    rtol = 1e-4 if name.endswith("float32") else 1e-10
    np.testing.assert_allclose(losses, d["loss"], rtol=rtol, atol=0)
    if "total_norm" in d:
        np.testing.assert_allclose(norms, d["total_norm"], rtol=rtol)
        assert (d["total_norm"] > d["max_norm"]).sum() >= 10   # most steps were clipped
    for layer in ("fc1", "fc2"):
        assert_scaled(adapter[layer].lora_a, d[f"{layer}.A"], 10 * rtol, f"{layer}.A")
        assert_scaled(adapter[layer].lora_b, d[f"{layer}.B"], 10 * rtol, f"{layer}.B")
    assert_scaled(mlp_forward_with_adapter(adapter, d, d["X"]), d["final_output"], 10 * rtol,
                  "final output")


def test_trained_adapter_round_trips_through_save_peft(tmp_path):
    """Trained here, saved for PEFT, loaded back: the same bits, and PEFT's trained factors."""
    d = load("mlp_default_float32.npz")
    adapter = mlp_adapter(d)
    train_mlp_with_api(adapter, d, int(d["steps"]))
    adapter.save_peft(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == ["fc1", "fc2"]
    loaded = LoraAdapter.from_peft(tmp_path, {"fc1": d["fc1_weight"], "fc2": d["fc2_weight"]})
    for layer in ("fc1", "fc2"):
        np.testing.assert_array_equal(loaded[layer].lora_a, adapter[layer].lora_a)
        np.testing.assert_array_equal(loaded[layer].lora_b, adapter[layer].lora_b)
        assert loaded[layer].scaling == adapter[layer].scaling
    np.testing.assert_array_equal(mlp_forward_with_adapter(loaded, d, d["X"]),
                                  mlp_forward_with_adapter(adapter, d, d["X"]))
    # PEFT's own trained adapter (the fixture) holds nearly the same factors.
    peft_made = LoraAdapter.from_peft(FIXTURES / "peft_adapter",
                                      {"fc1": d["fc1_weight"], "fc2": d["fc2_weight"]})
    for layer in ("fc1", "fc2"):
        assert_scaled(loaded[layer].lora_a, peft_made[layer].lora_a, 1e-3, layer)
        assert_scaled(loaded[layer].lora_b, peft_made[layer].lora_b, 1e-3, layer)


def test_training_resumes_from_state_dict_like_one_run():
    """Ten steps, state_dict, ten more in a new optimizer: PEFT's twenty-step curve, same bits."""
    d = load("mlp_default_float32.npz")
    whole = mlp_adapter(d)
    losses_whole, _ = train_mlp_with_api(whole, d, 20)
    first = mlp_adapter(d)
    losses_a, opt = train_mlp_with_api(first, d, 10)
    state = opt.state_dict()
    resumed_opt = fixture_adamw(d, first)
    resumed_opt.load_state_dict(state)
    # train_mlp_with_api makes its own optimizer; run the last ten steps here instead.
    fc1, fc2 = first["fc1"], first["fc2"]
    losses_b = []
    for _ in range(10):
        Z, c1 = fc1.forward_train(d["X"])
        Z += d["fc1_bias"]
        Hd = np.maximum(Z, 0)
        Out, c2 = fc2.forward_train(Hd)
        Out += d["fc2_bias"]
        diff = Out - d["T"]
        losses_b.append(float(np.mean(diff * diff)))
        fc1.backward(fc2.backward(diff * np.float32(2.0 / diff.size), c2) * (Z > 0), c1,
                     input_grad=False)
        resumed_opt.step()
        resumed_opt.zero_grad()
    np.testing.assert_array_equal(np.concatenate([losses_a, losses_b]), losses_whole)
    for layer in ("fc1", "fc2"):
        np.testing.assert_array_equal(first[layer].lora_a, whole[layer].lora_a)
        np.testing.assert_array_equal(first[layer].lora_b, whole[layer].lora_b)
    np.testing.assert_allclose(losses_whole, d["loss"], rtol=1e-4)


def test_peft_loads_the_adapter_numba_lora_trained(tmp_path):
    """Optional (torch + PEFT installed): PEFT runs numba_lora's saved adapter, same outputs."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import PeftModel

    sys.path.insert(0, str(FIXTURES))
    try:
        from make_fixtures import Mlp
    finally:
        sys.path.remove(str(FIXTURES))
    d = load("mlp_default_float32.npz")
    adapter = mlp_adapter(d)
    train_mlp_with_api(adapter, d, int(d["steps"]))
    adapter.save_peft(tmp_path)
    model = Mlp()
    model.load_state_dict({k.replace("_", "."): torch.from_numpy(d[k].copy())
                           for k in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")})
    model = PeftModel.from_pretrained(model, str(tmp_path)).eval()
    X = np.random.default_rng(3).standard_normal((7, d["X"].shape[1])).astype(np.float32)
    with torch.no_grad():
        theirs = model(torch.from_numpy(X)).numpy()
    assert_scaled(mlp_forward_with_adapter(adapter, d, X), theirs, 1e-5, "PEFT output")


# ------------------------------------------------------------- the example
def load_example():
    optim()
    path = Path(__file__).resolve().parent.parent / "examples" / "train_mlp.py"
    if not path.exists():
        pytest.skip("examples/ is not part of an installed package")
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_mlp_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_loss_falls_and_saved_adapter_loads(tmp_path):
    example = load_example()
    result = example.train_demo(epochs=3, verbose=False, out_dir=tmp_path / "adapter")
    assert result["test_loss"][-1] < 0.5 * result["test_loss"][0]
    assert len(result["step_loss"]) == 3 * 8 and len(result["train_loss"]) == 4
    base = result["base"]
    loaded = LoraAdapter.from_peft(tmp_path / "adapter",
                                   {"fc1": base["fc1_weight"], "fc2": base["fc2_weight"]})
    _, _, (X, _) = example.make_problem(0)
    np.testing.assert_array_equal(example.mlp_forward(loaded, base, X),
                                  example.mlp_forward(result["adapter"], base, X))


def test_example_main_runs(tmp_path, capsys):
    example = load_example()
    assert example.main(["--epochs", "2", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "epoch   2" in out and (tmp_path / "a" / "adapter_config.json").exists()


def test_pissa_adapter_converted_for_the_original_base(tmp_path):
    """The docs' recipe: rank 2r, A' = [A; A0], B' = [B, -B0], alpha doubled, on the original W."""
    optim()
    d = load("grads_float64_plain.npz")
    W, X, dY = d["W"], d["X"], d["dY"]
    layer = numba_lora.LoraLinear(W, rank=4, alpha=8.0, init="pissa")
    A0, B0 = layer.lora_a.copy(), layer.lora_b.copy()
    np.testing.assert_allclose(layer.forward_batch(X), X @ W.T, rtol=0, atol=1e-12)
    opt = optim().AdamW(layer, lr=1e-2)
    for _ in range(3):
        _, ctx = layer.forward_train(X)
        layer.backward(dY, ctx, input_grad=False)
        opt.step()
        opt.zero_grad()
    converted = LoraAdapter(numba_lora.LoraConfig(r=8, lora_alpha=16.0, target_modules=["proj"]))
    out = converted.add_layer("proj", W)
    out.lora_a = np.vstack([layer.lora_a, A0])
    out.lora_b = np.hstack([layer.lora_b, -B0])
    converted.save_peft(tmp_path)
    loaded = LoraAdapter.from_peft(tmp_path, {"proj": W})
    assert loaded["proj"].rank == 8 and loaded["proj"].scaling == layer.scaling
    np.testing.assert_allclose(loaded.forward_batch_layer("proj", X), layer.forward_batch(X),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("key", ["plain", "rslora"])
def test_pissa_init_equals_peft(key):
    """init="pissa" against PEFT's init_lora_weights="pissa" (signs of singular vectors aside)."""
    optim()
    d = load("pissa_float32.npz")
    layer = numba_lora.LoraLinear(d[f"{key}.W"], int(d["rank"]), float(d["alpha"]),
                                  use_rslora=bool(d[f"{key}.use_rslora"]), init="pissa")
    assert layer.scaling == pytest.approx(float(d[f"{key}.scaling"]), rel=1e-15)
    A, B = layer.lora_a.astype(np.float64), layer.lora_b.astype(np.float64)
    # Each singular pair may come with the opposite sign: A's row k and B's column k flip together.
    signs = np.sign(np.sum(A * d[f"{key}.A"], axis=1))
    # PEFT takes the SVD in float32, numba_lora in float64: singular vectors
    # in float32 are good to about eps * |W| / (gap between singular values).
    assert_scaled(A * signs[:, None], d[f"{key}.A"], 1e-4, "A")
    assert_scaled(B * signs[None, :], d[f"{key}.B"], 1e-4, "B")
    assert_scaled(layer.weight, d[f"{key}.W_res"], 1e-5, "residual W")
