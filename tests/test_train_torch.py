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
    return {f"{layer}.{ab}": data[f"{layer}.{ab}{suffix}"] for layer in ("fc1", "fc2") for ab in "AB"}


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
    """SIMD loops: every bit in float64; in float32 a few parameters differ where torch's sqrt does."""
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
                                  "mlp_nonzero_b_float32"])
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
    return adapter.forward_batch_layer("fc2", np.ascontiguousarray(Hd, dtype=X.dtype)) + d["fc2_bias"]


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
