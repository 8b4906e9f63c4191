"""numba_lora.kernels.qlora (NF4 forward kernels) against a float64 NumPy reference.

Both paths are checked: the public kernels (AVX-512 ``vpermps`` where the CPU
has it) and the portable loop (``_*_portable``), on shapes that cross every
edge of the storage: odd element counts, blocks that cross rows, a partial
last block, rows that start in a low nibble, several batch tiles.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numba import njit

import reference as ref
from numba_lora.errors import LoraDtypeError, LoraError, LoraShapeError, LoraTypeError
from numba_lora.kernels import qlora

CODE = qlora.NF4_CODE


# ------------------------------------------------------------ references
def nf4_case(rng, out_features, in_features, blocksize, rank, dq=False):
    """Random NF4 storage (every code, absmax in [0.05, 2]) and LoRA factors."""
    n = out_features * in_features
    nblocks = -(-n // blocksize)
    packed = rng.integers(0, 256, (n + 1) // 2, dtype=np.uint8)
    absmax = rng.uniform(0.05, 2.0, nblocks).astype(np.float32)
    A = rng.uniform(-1, 1, (rank, in_features)).astype(np.float32)
    B = rng.standard_normal((out_features, rank)).astype(np.float32)
    case = dict(packed=packed, absmax=absmax, blocksize=blocksize, A=A, B=B,
                shape=(out_features, in_features))
    if dq:
        case["absmax_q"] = rng.integers(0, 256, nblocks, dtype=np.uint8)
        case["nested_absmax"] = rng.uniform(0.5, 2.0, -(-nblocks // 256)).astype(np.float32)
        case["nested_code"] = np.sort(rng.uniform(-1, 1, 256)).astype(np.float32)
        case["offset"] = np.float32(rng.uniform(0.5, 1.0))
    return case


def dq_absmax(case):
    """absmax from double-quant state, each step rounded to float32 as promised."""
    q, na, nc = case["absmax_q"], case["nested_absmax"], case["nested_code"]
    scaled = (nc[q] * na[np.arange(q.size) // 256]).astype(np.float32)
    return (scaled + np.float32(case["offset"])).astype(np.float32)


def dequantized(case, dq=False, code=CODE):
    """W in float64, each weight ``code[q] * absmax[b]`` rounded to float32 first."""
    out_features, in_features = case["shape"]
    n = out_features * in_features
    packed = case["packed"]
    q = np.empty(2 * packed.size, np.uint8)
    q[0::2] = packed >> 4
    q[1::2] = packed & 15
    absmax = dq_absmax(case) if dq else case["absmax"]
    scale = np.repeat(absmax, case["blocksize"])[:n]
    return (code[q[:n]] * scale).astype(np.float32).astype(np.float64).reshape(
        out_features, in_features)


def expected(case, scaling, X, dq=False):
    W = dequantized(case, dq)
    return ref.forward(W, case["A"], case["B"], scaling, X)


# --------------------------------------------------------------- callers
KERNELS = {
    ("one", False, "public"): qlora.forward_nf4,
    ("one", False, "portable"): qlora._forward_nf4_portable,
    ("batch", False, "public"): qlora.forward_batch_nf4,
    ("batch", False, "portable"): qlora._forward_batch_nf4_portable,
    ("one", True, "public"): qlora.forward_nf4_dq,
    ("one", True, "portable"): qlora._forward_nf4_dq_portable,
    ("batch", True, "public"): qlora.forward_batch_nf4_dq,
    ("batch", True, "portable"): qlora._forward_batch_nf4_dq_portable,
}


def storage(case, dq):
    if dq:
        return (case["packed"], case["absmax_q"], case["nested_absmax"], case["nested_code"],
                case["offset"], case["blocksize"])
    return case["packed"], case["absmax"], CODE, case["blocksize"]


def run(case, scaling, X, dq, path):
    kind = "one" if X.ndim == 1 else "batch"
    out_features = case["shape"][0]
    out = np.full(out_features if X.ndim == 1 else (X.shape[0], out_features), np.nan,
                  np.float32)
    result = KERNELS[kind, dq, path](*storage(case, dq), case["A"], case["B"], scaling, X, out)
    assert result is out
    return out


PATHS = ["public", "portable"]
SHAPES = [
    # (out_features, in_features, blocksize)
    (5, 7, 32),        # odd n, rows starting in a low nibble, partial last block
    (3, 100, 32),      # blocks cross rows, rows start mid-block
    (4, 64, 64),       # rows are whole blocks
    (17, 96, 64),      # in_features not a multiple of blocksize, even
    (9, 200, 128),
    (6, 33, 4096),     # one partial block holds everything
    (2, 4096, 4096),
    (3, 250, 32),      # groups of 16 split by block edges
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dq", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_matches_reference(shape, dq, path, rng):
    case = nf4_case(rng, *shape, rank=3, dq=dq)
    x = rng.standard_normal(shape[1]).astype(np.float32)
    for scaling in (0.0, 0.75):
        ref.assert_close(run(case, scaling, x, dq, path), *expected(case, scaling, x, dq),
                         np.float32)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dq", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("batch", [0, 1, 2, 7, 8, 65])
def test_forward_batch_matches_reference(batch, dq, path, rng):
    case = nf4_case(rng, 11, 70, 32, rank=2, dq=dq)
    X = rng.standard_normal((batch, 70)).astype(np.float32)
    out = run(case, -1.5, X, dq, path)
    assert out.shape == (batch, 11)
    if batch:
        ref.assert_close(out, *expected(case, -1.5, X, dq), np.float32)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dq", [False, True], ids=["absmax", "double-quant"])
def test_batch_over_several_tiles(dq, path, rng):
    # TILE_BYTES of float32 rows per tile: at 2050 columns (2050 % 64 != 0),
    # 1100 rows are three tiles, the last one short.
    rows = qlora.TILE_BYTES // (4 * 2050)
    assert 2 * rows < 1100 < 3 * rows
    case = nf4_case(rng, 1100, 2050, 64, rank=16, dq=dq)
    X = rng.standard_normal((qlora.SMALL_BATCH + 1, 2050)).astype(np.float32)
    ref.assert_close(run(case, 0.5, X, dq, path), *expected(case, 0.5, X, dq), np.float32)


@pytest.mark.parametrize("rank", [0, 1, 16])
def test_ranks_and_zero_scaling(rank, rng):
    case = nf4_case(rng, 12, 48, 32, rank=rank)
    x = rng.standard_normal(48).astype(np.float32)
    X = rng.standard_normal((3, 48)).astype(np.float32)
    for scaling in (0.0, 2.0):
        for path in PATHS:
            ref.assert_close(run(case, scaling, x, False, path), *expected(case, scaling, x),
                             np.float32)
            ref.assert_close(run(case, scaling, X, False, path), *expected(case, scaling, X),
                             np.float32)
    # scaling 0 is the base product alone, whatever A and B hold.
    case["B"][:] = np.nan
    out = run(case, 0.0, x, False, "public")
    ref.assert_close(out, *ref.forward(dequantized(case), np.zeros((0, 48)), np.zeros((12, 0)),
                                       0.0, x), np.float32)


@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
def test_blocksizes(blocksize, rng):
    case = nf4_case(rng, 7, 130, blocksize, rank=1)
    x = rng.standard_normal(130).astype(np.float32)
    X = rng.standard_normal((5, 130)).astype(np.float32)
    for path in PATHS:
        ref.assert_close(run(case, 1.0, x, False, path), *expected(case, 1.0, x), np.float32)
        ref.assert_close(run(case, 1.0, X, False, path), *expected(case, 1.0, X), np.float32)


def test_any_code_table_is_used(rng):
    # forward_nf4 takes the code table as an argument: not only NF4's.
    case = nf4_case(rng, 4, 64, 32, rank=0)
    code = np.arange(16, dtype=np.float32) - 7.5
    x = rng.standard_normal(64).astype(np.float32)
    for fn in (qlora.forward_nf4, qlora._forward_nf4_portable):
        out = fn(case["packed"], case["absmax"], code, 32, case["A"], case["B"], 0.0, x,
                 np.empty(4, np.float32))
        W = dequantized(case, code=code)
        ref.assert_close(out, *ref.forward(W, case["A"], case["B"], 0.0, x), np.float32)


def test_empty_dimensions(rng):
    for out_features, in_features in [(0, 5), (4, 0), (0, 0)]:
        case = nf4_case(rng, out_features, in_features, 32, rank=2)
        x = np.ones(in_features, np.float32)
        X = np.ones((3, in_features), np.float32)
        for path in PATHS:
            assert np.array_equal(run(case, 1.0, x, False, path), np.zeros(out_features))
            assert np.array_equal(run(case, 1.0, X, False, path), np.zeros((3, out_features)))


@st.composite
def nf4_shapes(draw):
    out_features = draw(st.integers(1, 12))
    in_features = draw(st.integers(1, 150))
    blocksize = draw(st.sampled_from([32, 64, 128, 256, 4096]))
    rank = draw(st.integers(0, 4))
    batch = draw(st.integers(0, 9))
    seed = draw(st.integers(0, 2**32 - 1))
    return out_features, in_features, blocksize, rank, batch, seed


@given(nf4_shapes(), st.booleans(), st.sampled_from([0.0, 0.5, -3.0]))
def test_property_all_paths_match_reference(shape, dq, scaling):
    out_features, in_features, blocksize, rank, batch, seed = shape
    rng = np.random.default_rng(seed)
    case = nf4_case(rng, out_features, in_features, blocksize, rank, dq=dq)
    x = rng.standard_normal(in_features).astype(np.float32)
    X = rng.standard_normal((batch, in_features)).astype(np.float32)
    for path in PATHS:
        ref.assert_close(run(case, scaling, x, dq, path), *expected(case, scaling, x, dq),
                         np.float32)
        out = run(case, scaling, X, dq, path)
        if batch:
            ref.assert_close(out, *expected(case, scaling, X, dq), np.float32)


def test_fast_path_is_named():
    assert qlora.FAST_PATH in ("avx512-vpermps", "portable")
    assert (qlora.FAST_PATH == "avx512-vpermps") == qlora.HAVE_AVX512


# -------------------------------------------------------- user @njit code
@njit
def user_forward_nf4(packed, absmax, code, blocksize, A, B, scaling, x):
    out = np.empty(B.shape[0], dtype=np.float32)
    return qlora.forward_nf4(packed, absmax, code, blocksize, A, B, scaling, x, out)


@njit
def user_forward_batch_nf4(packed, absmax, code, blocksize, A, B, scaling, X):
    out = np.empty((X.shape[0], B.shape[0]), dtype=np.float32)
    return qlora.forward_batch_nf4(packed, absmax, code, blocksize, A, B, scaling, X, out)


@njit
def user_forward_nf4_dq(packed, absmax_q, nested_absmax, nested_code, offset, blocksize, A, B,
                        scaling, x):
    out = np.empty(B.shape[0], dtype=np.float32)
    return qlora.forward_nf4_dq(packed, absmax_q, nested_absmax, nested_code, offset, blocksize,
                                A, B, scaling, x, out)


@njit
def user_forward_batch_nf4_dq(packed, absmax_q, nested_absmax, nested_code, offset, blocksize,
                              A, B, scaling, X):
    out = np.empty((X.shape[0], B.shape[0]), dtype=np.float32)
    return qlora.forward_batch_nf4_dq(packed, absmax_q, nested_absmax, nested_code, offset,
                                      blocksize, A, B, scaling, X, out)


def test_kernels_from_user_njit(rng):
    case = nf4_case(rng, 9, 45, 32, rank=2, dq=True)
    x = rng.standard_normal(45).astype(np.float32)
    X = rng.standard_normal((4, 45)).astype(np.float32)
    args = (case["packed"], case["absmax"], CODE, 32, case["A"], case["B"], 0.5)
    dq_args = storage(case, True) + (case["A"], case["B"], 0.5)
    ref.assert_close(user_forward_nf4(*args, x), *expected(case, 0.5, x), np.float32)
    ref.assert_close(user_forward_batch_nf4(*args, X), *expected(case, 0.5, X), np.float32)
    ref.assert_close(user_forward_nf4_dq(*dq_args, x), *expected(case, 0.5, x, True),
                     np.float32)
    ref.assert_close(user_forward_batch_nf4_dq(*dq_args, X), *expected(case, 0.5, X, True),
                     np.float32)


def test_float64_from_user_njit_is_refused(rng):
    # The kernels are float32 only: float64 factors or inputs are a dtype error
    # raised from inside the user's compiled function.
    case = nf4_case(rng, 9, 45, 32, rank=2)
    x = rng.standard_normal(45)
    args = (case["packed"], case["absmax"], CODE, 32)
    with pytest.raises(LoraDtypeError, match="forward_nf4: x must have dtype float32"):
        user_forward_nf4(*args, case["A"], case["B"], 0.5, x)
    with pytest.raises(LoraDtypeError, match="forward_batch_nf4: A must have dtype float32"):
        user_forward_batch_nf4(*args, case["A"].astype(np.float64), case["B"], 0.5,
                               np.ones((3, 45), np.float32))


# --------------------------------------------------------- hostile inputs
def _hostile_cases(rng):
    """(name, kernel key, args, exception class) for every refused call."""
    case = nf4_case(rng, 6, 40, 32, rank=2, dq=True)
    packed, absmax, A, B = case["packed"], case["absmax"], case["A"], case["B"]
    x = rng.standard_normal(40).astype(np.float32)
    X = rng.standard_normal((3, 40)).astype(np.float32)
    out = np.zeros(6, np.float32)
    outb = np.zeros((3, 6), np.float32)
    ro = np.zeros(6, np.float32)
    ro.flags.writeable = False
    dq = storage(case, True)
    cases = [
        ("packed short", "one", (packed[:-1], absmax, CODE, 32, A, B, 1.0, x, out),
         LoraShapeError),
        ("packed long", "batch", (np.append(packed, 0).astype(np.uint8), absmax, CODE, 32, A, B,
                                  1.0, X, outb), LoraShapeError),
        ("absmax short", "one", (packed, absmax[:-1], CODE, 32, A, B, 1.0, x, out),
         LoraShapeError),
        ("absmax long", "batch", (packed, np.append(absmax, 1).astype(np.float32), CODE, 32, A,
                                  B, 1.0, X, outb), LoraShapeError),
        ("code 15", "one", (packed, absmax, CODE[:15], 32, A, B, 1.0, x, out), LoraShapeError),
        ("code 17", "batch", (packed, absmax, np.append(CODE, 0).astype(np.float32), 32, A, B,
                              1.0, X, outb), LoraShapeError),
        ("blocksize 0", "one", (packed, absmax, CODE, 0, A, B, 1.0, x, out), LoraShapeError),
        ("blocksize -64", "one", (packed, absmax, CODE, -64, A, B, 1.0, x, out), LoraShapeError),
        ("blocksize 48", "batch", (packed, absmax, CODE, 48, A, B, 1.0, X, outb),
         LoraShapeError),
        ("blocksize 16", "one", (packed, absmax, CODE, 16, A, B, 1.0, x, out), LoraShapeError),
        ("blocksize 8192", "one", (packed, absmax, CODE, 8192, A, B, 1.0, x, out),
         LoraShapeError),
        ("blocksize float", "one", (packed, absmax, CODE, 32.0, A, B, 1.0, x, out),
         LoraTypeError),
        ("float64 x", "one", (packed, absmax, CODE, 32, A, B, 1.0, x.astype(np.float64), out),
         LoraDtypeError),
        ("float64 absmax", "one", (packed, absmax.astype(np.float64), CODE, 32, A, B, 1.0, x,
                                   out), LoraDtypeError),
        ("int8 packed", "one", (packed.view(np.int8), absmax, CODE, 32, A, B, 1.0, x, out),
         LoraDtypeError),
        ("float64 out", "batch", (packed, absmax, CODE, 32, A, B, 1.0, X,
                                  outb.astype(np.float64)), LoraDtypeError),
        ("read-only out", "one", (packed, absmax, CODE, 32, A, B, 1.0, x, ro), LoraTypeError),
        ("A columns", "one", (packed, absmax, CODE, 32, A[:, :39].copy(), B, 1.0, x, out),
         LoraShapeError),
        ("B rows", "batch", (packed, absmax, CODE, 32, A, B[:5].copy(), 1.0, X, outb),
         LoraShapeError),
        ("rank mismatch", "one", (packed, absmax, CODE, 32, A[:1].copy(), B, 1.0, x, out),
         LoraShapeError),
        ("x length", "one", (packed, absmax, CODE, 32, A, B, 1.0, x[:39].copy(), out),
         LoraShapeError),
        ("out length", "one", (packed, absmax, CODE, 32, A, B, 1.0, x, out[:5].copy()),
         LoraShapeError),
        ("batch mismatch", "batch", (packed, absmax, CODE, 32, A, B, 1.0, X, outb[:2].copy()),
         LoraShapeError),
        ("strided x", "one", (packed, absmax, CODE, 32, A, B, 1.0,
                              np.repeat(x, 2)[::2], out), LoraShapeError),
        ("2-D x", "one", (packed, absmax, CODE, 32, A, B, 1.0, X, out), LoraShapeError),
        ("list x", "one", (packed, absmax, CODE, 32, A, B, 1.0, list(x), out), LoraTypeError),
        ("dq absmax_q short", "one_dq", (packed, case["absmax_q"][:-1]) + dq[2:]
         + (A, B, 1.0, x, out), LoraShapeError),
        ("dq nested_absmax long", "batch_dq",
         (packed, case["absmax_q"], np.append(case["nested_absmax"], 1).astype(np.float32))
         + dq[3:] + (A, B, 1.0, X, outb), LoraShapeError),
        ("dq nested_code 255", "one_dq", dq[:3] + (case["nested_code"][:255],) + dq[4:]
         + (A, B, 1.0, x, out), LoraShapeError),
        ("dq float32 absmax_q", "one_dq", (packed, case["absmax_q"].astype(np.float32))
         + dq[2:] + (A, B, 1.0, x, out), LoraDtypeError),
        ("dq blocksize 100", "batch_dq", dq[:5] + (100, A, B, 1.0, X, outb), LoraShapeError),
    ]
    return cases


HOSTILE_KERNELS = {
    "one": (qlora.forward_nf4, qlora._forward_nf4_portable),
    "batch": (qlora.forward_batch_nf4, qlora._forward_batch_nf4_portable),
    "one_dq": (qlora.forward_nf4_dq, qlora._forward_nf4_dq_portable),
    "batch_dq": (qlora.forward_batch_nf4_dq, qlora._forward_batch_nf4_dq_portable),
}


def test_hostile_inputs_are_refused_and_leave_arrays_untouched():
    rng = np.random.default_rng(7)
    for name, kind, args, exc in _hostile_cases(rng):
        for fn in HOSTILE_KERNELS[kind]:
            before = [np.array(a, copy=True) if isinstance(a, np.ndarray) else a for a in args]
            with pytest.raises(exc) as info:
                fn(*args)
            assert isinstance(info.value, LoraError), name
            for a, b in zip(args, before):
                if isinstance(a, np.ndarray):
                    assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
