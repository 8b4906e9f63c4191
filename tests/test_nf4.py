"""numba_lora.nf4: bit-exact with bitsandbytes' fixtures, torch-free; immutable containers;
bitsandbytes state dicts read, written and refused when malformed."""

import copy
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from numba_lora import LoraConfigError, LoraDtypeError, LoraError, LoraFormatError, \
    LoraNonFiniteError, LoraShapeError, LoraTypeError, LoraUnsupportedError, nf4

HERE = Path(__file__).resolve().parent / "fixtures" / "nf4"
sys.path.insert(0, str(HERE))
import nf4_reference as R  # noqa: E402  (tests/fixtures/nf4/nf4_reference.py)
CODES = np.load(HERE / "codes.npz")
REF = np.load(HERE / "linear4bit_ref.npz")


def bits(a):
    a = np.asarray(a)
    return a.view({4: np.uint32, 2: np.uint16, 1: np.uint8}[a.itemsize])


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(bits(a), bits(b))


def _cases():
    with np.load(HERE / "quantize.npz") as data:
        fields = {}
        for key in data.files:
            name, field = key.split("/")
            fields.setdefault(name, {})[field] = data[key]
    return fields


CASES = _cases()
PLAIN = sorted(k for k, v in CASES.items() if "absmax" in v)
DQ = sorted(k for k, v in CASES.items() if "absmax_q" in v)


# ----------------------------------------------------------------- tables
def test_code_tables_are_bitsandbytes():
    assert same_bits(nf4.NF4_CODE, CODES["nf4"])
    assert same_bits(nf4.DYNAMIC_CODE, CODES["dynamic"])
    for table in (nf4.NF4_CODE, nf4.DYNAMIC_CODE):
        assert not table.flags.writeable
    assert nf4.BLOCKSIZES == (32, 64, 128, 256, 512, 1024, 2048, 4096)


# --------------------------------------------------------------- fixtures
@pytest.mark.parametrize("name", PLAIN)
def test_quantize_matches_bitsandbytes(name):
    case = CASES[name]
    q = nf4.quantize(case["W"], int(case["blocksize"]))
    assert same_bits(q.packed, case["packed"])
    assert same_bits(q.absmax, case["absmax"])
    assert q.shape == case["W"].shape and not q.double_quant
    if "dequantized" in case:
        assert same_bits(nf4.dequantize(q), case["dequantized"])


@pytest.mark.parametrize("name", DQ)
def test_double_quant_matches_bitsandbytes(name):
    case = CASES[name]
    q = nf4.quantize(case["W"], int(case["blocksize"]), double_quant=True)
    assert same_bits(q.packed, case["packed"])
    assert same_bits(q.nested_code, case["nested_code"])
    # bitsandbytes' offset is torch's float32 mean, machine-dependent in its
    # last bit; ours is the float64 mean rounded: at most one float32 step apart.
    assert abs(int(bits(np.float32(q.offset))) - int(bits(case["offset"]))) <= 1
    # With bitsandbytes' offset, every other bit is bitsandbytes'.
    given_offset = nf4.NF4Weight(q.shape, q.blocksize, q.packed,
                                 *[None],
                                 absmax_q=R.quantize_absmax(
                                     R.quantize(case["W"], CODES["nf4"], q.blocksize)[1],
                                     case["offset"], CODES["dynamic"])[0],
                                 nested_absmax=case["nested_absmax"], offset=case["offset"])
    assert same_bits(given_offset.absmax_q, case["absmax_q"])
    assert same_bits(given_offset.absmax_float32(), case["absmax_restored"])
    bnb = nf4.NF4Weight(q.shape, q.blocksize, case["packed"], absmax_q=case["absmax_q"],
                        nested_absmax=case["nested_absmax"], nested_code=case["nested_code"],
                        offset=case["offset"])
    if "dequantized" in case:
        assert same_bits(nf4.dequantize(bnb), case["dequantized"])


def test_own_double_quant_is_its_own_reference():
    case = CASES["dq_partial_bs32"]
    q = nf4.quantize(case["W"], 32, double_quant=True)
    absmax = R.quantize(case["W"], CODES["nf4"], 32)[1]
    assert q.offset == R.mean_offset(absmax)
    Q, N = R.quantize_absmax(absmax, q.offset, CODES["dynamic"])
    assert same_bits(q.absmax_q, Q) and same_bits(q.nested_absmax, N)
    restored = R.restore_absmax(Q, N, CODES["dynamic"], q.offset)
    assert same_bits(q.absmax_float32(), restored)
    assert same_bits(nf4.dequantize(q), R.dequantize(q.packed, restored, CODES["nf4"], 32, q.shape))


@pytest.mark.parametrize("suffix", ["", "_dq"])
def test_linear4bit_safetensors_loads_without_torch(suffix):
    q = nf4.load_bnb_safetensors(HERE / f"linear4bit{suffix}.safetensors")
    assert q.shape == (40, 96) and q.blocksize == 64 and q.double_quant == (suffix == "_dq")
    assert same_bits(nf4.dequantize(q), REF["deq" + suffix])
    again = nf4.from_bnb_state_dict(nf4.to_bnb_state_dict(q))
    assert again == q


def test_prefix(tmp_path):
    q = nf4.load_bnb_safetensors(HERE / "linear4bit.safetensors")
    tensors = nf4.to_bnb_state_dict(q, prefix="model.layers.0.q_proj.")
    assert all(k.startswith("model.layers.0.q_proj.weight") for k in tensors)
    assert nf4.from_bnb_state_dict(tensors, "model.layers.0.q_proj.") == q
    safetensors = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "model.safetensors"
    safetensors.save_file(tensors, str(path))
    assert nf4.load_bnb_safetensors(path, prefix="model.layers.0.q_proj.") == q
    with pytest.raises(LoraFormatError, match="has no tensor"):
        nf4.load_bnb_safetensors(path, prefix="model.layers.1.q_proj.")


def test_bitsandbytes_reads_what_we_write(tmp_path):
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    from safetensors.numpy import save_file
    from safetensors.torch import load_file

    W = np.random.default_rng(3).standard_normal((40, 96)).astype(np.float32)
    for dq in (False, True):
        q = nf4.quantize(W, 64, double_quant=dq)
        save_file(nf4.to_bnb_state_dict(q), str(tmp_path / "w.safetensors"))
        sd = load_file(str(tmp_path / "w.safetensors"))
        layer = bnb.nn.Linear4bit(96, 40, bias=False, quant_type="nf4")
        stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
        layer.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu",
                                                           module=layer)
        assert layer.weight.quant_state.shape == torch.Size([40, 96])


# ------------------------------------------------------------- semantics
def test_float64_is_rounded_to_float32_first(rng):
    W = rng.standard_normal((9, 70))
    a, b = nf4.quantize(W, 32), nf4.quantize(W.astype(np.float32), 32)
    assert a == b
    with pytest.raises(LoraNonFiniteError, match="beyond float32"):
        nf4.quantize(np.full((2, 32), 1e39), 32)


def test_float16_is_widened_exactly(rng):
    W = rng.standard_normal((5, 64)).astype(np.float16)
    q = nf4.quantize(W)
    assert q == nf4.NF4Weight(q.shape, 64, q.packed, q.absmax, source_dtype="float16")
    assert q == nf4.quantize(W.astype(np.float32)) or q.source_dtype == "float16"
    assert same_bits(q.packed, nf4.quantize(W.astype(np.float32)).packed)


@given(rows=st.integers(1, 6), cols=st.integers(1, 90), blocksize=st.sampled_from([32, 64, 128]),
       double_quant=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_public_functions_match_reference(rows, cols, blocksize, double_quant, seed):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((rows, cols)) * 10.0 ** rng.uniform(-4, 4)).astype(np.float32)
    q = nf4.quantize(W, blocksize, double_quant=double_quant)
    P, A = R.quantize(W, CODES["nf4"], blocksize)
    assert same_bits(q.packed, P)
    if double_quant:
        Q, N = R.quantize_absmax(A, R.mean_offset(A), CODES["dynamic"])
        assert same_bits(q.absmax_q, Q) and same_bits(q.nested_absmax, N)
        A = R.restore_absmax(Q, N, CODES["dynamic"], R.mean_offset(A))
    else:
        assert same_bits(q.absmax, A)
    deq = nf4.dequantize(q)
    assert same_bits(deq, R.dequantize(P, A, CODES["nf4"], blocksize, W.shape))
    out = np.full(W.shape, np.nan, np.float32)
    assert nf4.dequantize(q, out=out) is out and same_bits(out, deq)
    # Dequantized values are within the block's scale of the input.
    if not double_quant:
        scale = np.repeat(A, blocksize)[:W.size].reshape(W.shape)
        assert (np.abs(deq - W) <= scale * 0.16 + 1e-30).all()


def test_memory_targets():
    # 4096 x 4096 at blocksize 64 has the ratio of any whole number of blocks.
    plain = nf4.quantize(np.ones((64, 64), np.float32))
    assert plain.nbytes / (64 * 64 * 4) == pytest.approx(0.140625)
    W = np.random.default_rng(0).standard_normal((256, 4096)).astype(np.float32)
    dq = nf4.quantize(W, double_quant=True)
    assert dq.nbytes / W.nbytes <= 0.13
    assert plain.nbytes / (64 * 64 * 4) <= 0.145


# -------------------------------------------------------------- container
def test_weight_is_immutable_and_read_only():
    q = nf4.quantize(np.ones((3, 40), np.float32), 32, double_quant=True)
    for name in ("packed", "absmax_q", "nested_absmax", "nested_code", "code"):
        assert not getattr(q, name).flags.writeable, name
    with pytest.raises(LoraTypeError, match="immutable"):
        q.blocksize = 64
    with pytest.raises(LoraTypeError, match="immutable"):
        del q._packed
    with pytest.raises(ValueError):
        q.packed[0] = 1
    restored = q.absmax_float32()
    restored[0] = 99  # a fresh array each time
    assert q.absmax_float32()[0] != 99


def test_constructor_copies_and_checks(rng):
    packed = np.zeros(64, np.uint8)
    absmax = np.ones(2, np.float32)
    q = nf4.NF4Weight((4, 32), 64, packed, absmax)
    packed[0] = 255
    assert q.packed[0] == 0
    with pytest.raises(LoraShapeError, match="packed must have shape"):
        nf4.NF4Weight((4, 33), 64, np.zeros(64, np.uint8), absmax)
    with pytest.raises(LoraDtypeError, match="absmax must have dtype float32"):
        nf4.NF4Weight((4, 32), 64, np.zeros(64, np.uint8), np.ones(2))
    with pytest.raises(LoraNonFiniteError):
        nf4.NF4Weight((4, 32), 64, np.zeros(64, np.uint8), np.array([1, np.nan], np.float32))
    with pytest.raises(LoraConfigError, match="negative"):
        nf4.NF4Weight((4, 32), 64, np.zeros(64, np.uint8), np.array([1, -1], np.float32))
    with pytest.raises(LoraConfigError, match="either"):
        nf4.NF4Weight((4, 32), 64, np.zeros(64, np.uint8), absmax, offset=0.0)
    with pytest.raises(LoraConfigError, match="give absmax"):
        nf4.NF4Weight((4, 32), 64, np.zeros(64, np.uint8))
    for shape in [(0, 4), (4,), (2, 3, 4), "ab", (2.0, 3)]:
        with pytest.raises(LoraError):
            nf4.NF4Weight(shape, 64, np.zeros(4, np.uint8), np.ones(1, np.float32))
    with pytest.raises(LoraTypeError):
        nf4.NF4Weight(5, 64, np.zeros(4, np.uint8), np.ones(1, np.float32))
    with pytest.raises(LoraConfigError, match="source_dtype"):
        nf4.NF4Weight((4, 32), 64, np.zeros(64, np.uint8), absmax, source_dtype="int8")


@pytest.mark.parametrize("dq", [False, True])
def test_pickle_copy_eq_repr(dq, rng):
    q = nf4.quantize(rng.standard_normal((5, 77)).astype(np.float32), 32, double_quant=dq)
    back = pickle.loads(pickle.dumps(q))
    assert back == q and back is not q
    assert not back.packed.flags.writeable
    assert copy.copy(q) is q and copy.deepcopy(q) is q
    other = nf4.quantize(rng.standard_normal((5, 77)).astype(np.float32), 32, double_quant=dq)
    assert other != q and q != "q"
    assert repr(q).startswith("NF4Weight(shape=(5, 77), blocksize=32")
    assert ("double_quant=True" in repr(q)) == dq
    with pytest.raises(TypeError):
        hash(q)


# ---------------------------------------------------------------- hostile
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_refused(bad):
    W = np.ones((4, 64), np.float32)
    W[2, 5] = bad
    before = W.copy()
    with pytest.raises(LoraNonFiniteError, match="inf or NaN"):
        nf4.quantize(W)
    assert same_bits(W, before)


@pytest.mark.parametrize("blocksize", [0, 16, 48, 8192, 64.0, True, "64", None])
def test_bad_blocksize(blocksize):
    with pytest.raises(LoraConfigError, match="blocksize"):
        nf4.quantize(np.ones((2, 64), np.float32), blocksize)


@pytest.mark.parametrize("weight, error", [
    (np.ones(64, np.float32), LoraShapeError),
    (np.ones((2, 2, 16), np.float32), LoraShapeError),
    (np.ones((0, 64), np.float32), LoraShapeError),
    (np.ones((4, 0), np.float32), LoraShapeError),
    (np.ones((4, 64), np.int32), LoraDtypeError),
    (np.ones((4, 64), bool), LoraDtypeError),
    (np.ones((4, 64), np.complex64), LoraDtypeError),
    ([[1.0, 2.0], [3.0]], LoraDtypeError),
    ("weights", LoraDtypeError),
])
def test_bad_weights(weight, error):
    with pytest.raises(error):
        nf4.quantize(weight)


def test_bad_double_quant_flag():
    with pytest.raises(LoraTypeError, match="double_quant"):
        nf4.quantize(np.ones((2, 64), np.float32), double_quant="yes")


def test_dequantize_bad_arguments():
    q = nf4.quantize(np.ones((2, 64), np.float32))
    with pytest.raises(LoraTypeError):
        nf4.dequantize(np.ones((2, 64)))
    for out, error in [(np.empty((2, 64)), LoraDtypeError), (np.empty((2, 63), np.float32),
                       LoraShapeError), (np.empty((64, 2), np.float32).T, LoraShapeError),
                       ([[0.0]], LoraTypeError)]:
        with pytest.raises(error):
            nf4.dequantize(q, out=out)


def _state(dq=False):
    return nf4.to_bnb_state_dict(
        nf4.load_bnb_safetensors(HERE / f"linear4bit{'_dq' if dq else ''}.safetensors"))


def _without(tensors, key):
    tensors.pop(key)
    return tensors


def _json(tensors, **changes):
    key = "weight.quant_state.bitsandbytes__nf4"
    state = json.loads(tensors[key].tobytes())
    for k, v in changes.items():
        if v is KeyError:
            state.pop(k)
        else:
            state[k] = v
    tensors[key] = np.frombuffer(json.dumps(state).encode(), np.uint8).copy()
    return tensors


def _raw(tensors, raw):
    tensors["weight.quant_state.bitsandbytes__nf4"] = np.frombuffer(raw, np.uint8).copy()
    return tensors


HOSTILE_STATES = {
    "no weight": (False, lambda t: _without(t, "weight"), "has no tensor 'weight'"),
    "no absmax": (False, lambda t: _without(t, "weight.absmax"), "weight.absmax"),
    "no quant state": (False, lambda t: _without(t, "weight.quant_state.bitsandbytes__nf4"),
                       "quant_state"),
    "short weight": (False, lambda t: {**t, "weight": t["weight"][:-1]}, "has shape"),
    "weight 2-D wrong": (False, lambda t: {**t, "weight": t["weight"].reshape(2, -1)}, "has shape"),
    "weight int8": (False, lambda t: {**t, "weight": t["weight"].view(np.int8)}, "dtype"),
    "long absmax": (False, lambda t: {**t, "weight.absmax": np.ones(61, np.float32)}, "shape"),
    "absmax float64": (False, lambda t: {**t, "weight.absmax": t["weight.absmax"].astype(float)},
                       "dtype"),
    "absmax NaN": (False, lambda t: {**t, "weight.absmax": np.full(60, np.nan, np.float32)},
                   "inf or NaN"),
    "quant_map changed": (False, lambda t: {**t, "weight.quant_map": t["weight.quant_map"] * 2},
                          "not the NF4 code table"),
    "quant_map short": (False, lambda t: {**t, "weight.quant_map": t["weight.quant_map"][:8]},
                        "shape"),
    "not utf-8": (False, lambda t: _raw(t, b"\xff\xfe{"), "UTF-8 JSON"),
    "not json": (False, lambda t: _raw(t, b"{quant_type: nf4"), "UTF-8 JSON"),
    "json list": (False, lambda t: _raw(t, b"[1, 2]"), "not an object"),
    "json 2-D": (False, lambda t: {**t, "weight.quant_state.bitsandbytes__nf4":
                                   t["weight.quant_state.bitsandbytes__nf4"].reshape(1, -1)},
                 "1-D uint8"),
    "missing shape": (False, lambda t: _json(t, shape=KeyError), "expected"),
    "unknown key": (False, lambda t: _json(t, extra=1), "expected"),
    "blocksize 48": (False, lambda t: _json(t, blocksize=48), "blocksize"),
    "blocksize str": (False, lambda t: _json(t, blocksize="64"), "blocksize"),
    "blocksize bool": (False, lambda t: _json(t, blocksize=True), "blocksize"),
    "shape 1-D": (False, lambda t: _json(t, shape=[3840]), "shape"),
    "shape negative": (False, lambda t: _json(t, shape=[-40, -96]), "shape"),
    "shape mismatch": (False, lambda t: _json(t, shape=[41, 96]), "has shape"),
    "dtype int8": (False, lambda t: _json(t, dtype="int8"), "dtype"),
    "half nested": (False, lambda t: _json(t, nested_offset=1.0), "not all of"),
    "nested tensors only": (False, lambda t: {**t, "weight.nested_absmax": np.ones(1, np.float32)},
                            "half there"),
    "nested offset NaN": (True, lambda t: _raw(t, t["weight.quant_state.bitsandbytes__nf4"]
                                               .tobytes().replace(b'"nested_offset": ',
                                                                  b'"nested_offset": NaN, "x": ')),
                          "expected|finite"),
    "nested offset string": (True, lambda t: _json(t, nested_offset="1.0"), "nested_offset"),
    "nested offset huge": (True, lambda t: _json(t, nested_offset=1e300), "nested_offset"),
    "nested blocksize": (True, lambda t: _json(t, nested_blocksize=128), "nested_blocksize"),
    "nested dtype": (True, lambda t: _json(t, nested_dtype="float16"), "nested_dtype"),
    "dq absmax float": (True, lambda t: {**t, "weight.absmax": np.ones(60, np.float32)}, "dtype"),
    "no nested absmax": (True, lambda t: _without(t, "weight.nested_absmax"), "nested_absmax"),
    "long nested absmax": (True, lambda t: {**t, "weight.nested_absmax": np.ones(2, np.float32)},
                           "shape"),
    "nested code NaN": (True, lambda t: {**t, "weight.nested_quant_map":
                                         np.full(256, np.nan, np.float32)}, "inf or NaN"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_STATES))
def test_malformed_state_dicts(name):
    dq, mutate, match = HOSTILE_STATES[name]
    tensors = mutate(_state(dq))
    with pytest.raises(LoraFormatError, match=match):
        nf4.from_bnb_state_dict(tensors)


def test_fp4_and_other_types_refused():
    tensors = _state()
    with pytest.raises(LoraUnsupportedError, match="fp4"):
        nf4.from_bnb_state_dict(_json(tensors, quant_type="fp4"))
    tensors = _state()
    tensors["weight.quant_state.bitsandbytes__fp4"] = tensors.pop(
        "weight.quant_state.bitsandbytes__nf4")
    with pytest.raises(LoraUnsupportedError, match="FP4"):
        nf4.from_bnb_state_dict(tensors)
    with pytest.raises(LoraTypeError):
        nf4.from_bnb_state_dict([("weight", np.zeros(3))])
    with pytest.raises(LoraTypeError):
        nf4.from_bnb_state_dict(_state(), prefix=3)
    with pytest.raises(LoraTypeError):
        nf4.to_bnb_state_dict("q")


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(LoraFormatError, match="does not exist"):
        nf4.load_bnb_safetensors(tmp_path / "nope.safetensors")


@given(rows=st.integers(1, 5), cols=st.integers(1, 80), blocksize=st.sampled_from([32, 64]),
       double_quant=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_state_dict_round_trip(rows, cols, blocksize, double_quant, seed):
    W = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    q = nf4.quantize(W, blocksize, double_quant=double_quant)
    tensors = nf4.to_bnb_state_dict(q, prefix="p.")
    assert tensors["p.weight"].shape == ((rows * cols + 1) // 2, 1)
    state = json.loads(tensors["p.weight.quant_state.bitsandbytes__nf4"].tobytes())
    assert state["shape"] == [rows, cols] and state["blocksize"] == blocksize
    back = nf4.from_bnb_state_dict(tensors, "p.")
    assert back == q and same_bits(nf4.dequantize(back), nf4.dequantize(q))
