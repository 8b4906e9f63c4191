"""MultiLoraLinear and the multi-adapter kernels: rows match per-adapter LoraLinear results."""

import copy
import pickle
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numba import njit

import reference as ref
from numba_lora import (
    LoraAdapter,
    LoraConfig,
    LoraConfigError,
    LoraDtypeError,
    LoraError,
    LoraKeyError,
    LoraLinear,
    LoraShapeError,
    LoraTypeError,
    MultiLoraLinear,
    kernels,
)

PATHS = ["auto", "segmented", "rows"]


def build(rng, out_features, in_features, ranks, dtype, rslora=False):
    """A MultiLoraLinear and, for each adapter, the equivalent LoraLinear."""
    W = rng.standard_normal((out_features, in_features)).astype(dtype)
    multi = MultiLoraLinear(W)
    singles = []
    for i, rank in enumerate(ranks):
        layer = LoraLinear(W, rank, 2.0 + i, seed=i, use_rslora=rslora)
        layer.lora_b = rng.standard_normal((out_features, rank))
        multi.add_layer(f"adapter{i}", layer)
        singles.append(layer)
    return multi, singles, W


def check_rows(multi, singles, W, X, ids, path, dtype):
    Y = multi.forward_batch(X, ids, path=path)
    assert Y.shape == (X.shape[0], multi.out_features) and Y.dtype == dtype
    for b, i in enumerate(ids):
        if i < 0:
            expected = ref.forward(W, np.zeros((1, W.shape[1])), np.zeros((W.shape[0], 1)), 0.0, X[b])
        else:
            layer = singles[i]
            expected = ref.forward(W, layer.lora_a, layer.lora_b, layer.scaling, X[b])
            # ... and what the LoraLinear itself gives, within the same tolerance.
            ref.assert_close(layer.forward(X[b]), *expected, dtype)
        ref.assert_close(Y[b], *expected, dtype)
    return Y


@given(
    out_features=st.integers(1, 20),
    in_features=st.integers(1, 20),
    n_adapters=st.integers(1, 5),
    batch=st.integers(0, 12),
    pattern=st.sampled_from(["random", "all_base", "one_adapter", "each_own"]),
    dtype=st.sampled_from(ref.DTYPES),
    seed=st.integers(0, 2**31),
)
def test_rows_match_their_adapter(out_features, in_features, n_adapters, batch, pattern, dtype, seed):
    rng = np.random.default_rng(seed)
    max_rank = min(out_features, in_features)
    ranks = [int(rng.integers(1, max_rank + 1)) for _ in range(n_adapters)]
    multi, singles, W = build(rng, out_features, in_features, ranks, dtype, rslora=seed % 2 == 0)
    X = rng.standard_normal((batch, in_features)).astype(dtype)
    if pattern == "random":
        ids = rng.integers(-1, n_adapters, batch)
    elif pattern == "all_base":
        ids = np.full(batch, -1)
    elif pattern == "one_adapter":
        ids = np.full(batch, n_adapters - 1)
    else:
        ids = np.arange(batch) % n_adapters
    results = [check_rows(multi, singles, W, X, ids, path, dtype) for path in PATHS]
    names = [None if i < 0 else f"adapter{i}" for i in ids]
    np.testing.assert_array_equal(multi.forward_batch(X, names), results[0])


def test_one_adapter_batch_matches_lora_linear_batch(rng):
    multi, singles, W = build(rng, 40, 30, [4, 8], np.float32)
    X = rng.standard_normal((9, 30)).astype(np.float32)
    for path in PATHS:
        Y = multi.forward_batch(X, np.ones(9, np.int64), path=path)
        ref.assert_close(Y, *ref.forward(W, singles[1].lora_a, singles[1].lora_b, singles[1].scaling, X),
                         np.float32)
        ref.assert_close(singles[1].forward_batch(X), Y.astype(np.float64),
                         ref.forward(W, singles[1].lora_a, singles[1].lora_b, singles[1].scaling, X)[1],
                         np.float32)


@njit
def user_multi(W, A_cat, BT_cat, offsets, scalings, X, ids):
    a = np.empty((X.shape[0], W.shape[0]), dtype=W.dtype)
    b = np.empty_like(a)
    c = np.empty_like(a)
    kernels.forward_batch_multi(W, A_cat, BT_cat, offsets, scalings, X, ids, a)
    kernels.forward_batch_multi_segmented(W, A_cat, BT_cat, offsets, scalings, X, ids, b)
    kernels.forward_batch_multi_rows(W, A_cat, BT_cat, offsets, scalings, X, ids, c)
    return a, b, c


def test_multi_kernels_from_user_njit(dtype, rng):
    W, A0, B0 = ref.random_lora(rng, 12, 9, 2, dtype)
    _, A1, B1 = ref.random_lora(rng, 12, 9, 3, dtype)
    A_cat = np.ascontiguousarray(np.vstack([A0, A1]))
    BT_cat = np.ascontiguousarray(np.vstack([B0.T, B1.T]))
    offsets = np.array([0, 2, 5], np.int64)
    scalings = np.array([0.5, 2.0])
    X = rng.standard_normal((6, 9)).astype(dtype)
    ids = np.array([1, -1, 0, 1, 1, 0], np.int64)
    for Y in user_multi(W, A_cat, BT_cat, offsets, scalings, X, ids):
        assert Y.dtype == dtype
        for b, i in enumerate(ids):
            A, B, s = [(A0, B0, 0.5), (A1, B1, 2.0)][i] if i >= 0 else (A0, B0, 0.0)
            ref.assert_close(Y[b], *ref.forward(W, A, B, s, X[b]), dtype)


def test_kernels_reject_bad_ids_and_packing(rng):
    W, A, B = ref.random_lora(rng, 5, 4, 2, np.float64)
    X = np.ones((2, 4))
    out = np.empty((2, 5))
    args = (W, A, np.ascontiguousarray(B.T), np.array([0, 2], np.int64), np.array([1.0]))
    with pytest.raises(LoraKeyError, match="adapter id out of range"):
        kernels.forward_batch_multi(*args, X, np.array([0, 1], np.int64), out)
    with pytest.raises(ValueError, match="one entry per row"):
        kernels.forward_batch_multi(*args, X, np.array([0], np.int64), out)
    with pytest.raises(ValueError, match="offsets"):
        kernels.forward_batch_multi(W, A, np.ascontiguousarray(B.T), np.array([0, 3], np.int64),
                                    np.array([1.0]), X, np.array([0, 0], np.int64), out)


def test_thread_safety_eight_threads(rng):
    multi, _, _ = build(rng, 64, 48, [4, 8, 2, 16], np.float32)
    jobs = []
    for t in range(8):
        X = rng.standard_normal((17 + t, 48)).astype(np.float32)
        ids = rng.integers(-1, 4, X.shape[0])
        jobs.append((X, ids))
    serial = [multi.forward_batch(X, ids) for X, ids in jobs]
    results = [None] * 8
    barrier = threading.Barrier(8)

    def work(t):
        barrier.wait()
        for _ in range(20):
            results[t] = multi.forward_batch(*jobs[t])

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for got, want in zip(results, serial):
        np.testing.assert_array_equal(got, want)


def test_adding_and_removing_adapters(rng):
    multi, singles, W = build(rng, 10, 8, [2, 3, 4], np.float64)
    assert multi.adapter_names == ["adapter0", "adapter1", "adapter2"] and len(multi) == 3
    assert "adapter1" in multi and multi.rank("adapter2") == 4
    assert multi.scaling("adapter1") == singles[1].scaling
    X = rng.standard_normal((3, 8))
    before = multi.forward_batch(X, ["adapter2"] * 3)
    multi.remove_adapter("adapter1")
    assert multi.adapter_names == ["adapter0", "adapter2"]
    np.testing.assert_array_equal(multi.forward_batch(X, [1, 1, 1]), before)  # ids shifted
    with pytest.raises(LoraKeyError, match="no adapter named 'adapter1'"):
        multi.remove_adapter("adapter1")
    multi.add_adapter("rs", np.ones((4, 8)), np.ones((10, 4)), alpha=8.0, use_rslora=True)
    assert multi.scaling("rs") == 4.0


def test_adapters_from_a_lora_adapter(rng):
    adapter = LoraAdapter(LoraConfig(r=4, lora_alpha=8))
    W = rng.standard_normal((12, 6)).astype(np.float32)
    layer = adapter.add_layer("q_proj", W)
    layer.lora_b = rng.standard_normal((12, 4))
    multi = MultiLoraLinear(W)
    multi.add_layer("customer-a", adapter["q_proj"])
    X = rng.standard_normal((2, 6)).astype(np.float32)
    ref.assert_close(multi.forward_batch(X, ["customer-a", "customer-a"]),
                     *ref.forward(W, layer.lora_a, layer.lora_b, layer.scaling, X), np.float32)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m: m.forward_batch(np.ones((3, 8)), [0, 5, 1]), LoraKeyError,
         r"adapter id 5 at row 1 is out of range: expected -1 \(base only\) or 0..1"),
        (lambda m: m.forward_batch(np.ones((3, 8)), [0, -2, 1]), LoraKeyError, "adapter id -2 at row 1"),
        (lambda m: m.forward_batch(np.ones((3, 8)), ["adapter0", "zzz", None]), LoraKeyError,
         "no adapter named 'zzz'"),
        (lambda m: m.forward_batch(np.ones((3, 8)), [0, 1]), LoraShapeError,
         r"one entry per row of X \(3\), got shape \(2,\)"),
        (lambda m: m.forward_batch(np.ones((3, 8)), "adapter0"), TypeError, "must be a sequence"),
        (lambda m: m.forward_batch(np.ones((3, 8)), [0, 1.5, 1]), TypeError, r"adapter_ids\[1\]"),
        (lambda m: m.forward_batch(np.ones((3, 7)), [0, 1, 1]), LoraShapeError, "in_features = 7"),
        (lambda m: m.forward_batch(np.ones((3, 8)), [0, 1, 1], path="fast"), ValueError, "path must be"),
        (lambda m: m.add_adapter("adapter0", np.ones((2, 8)), np.ones((10, 2)), 1.0), LoraConfigError,
         "already has an adapter named 'adapter0'"),
        (lambda m: m.add_adapter("x", np.ones((2, 7)), np.ones((10, 2)), 1.0), LoraShapeError,
         r"A has in_features = 7 \(axis 1\), expected 8"),
        (lambda m: m.add_adapter("x", np.ones((2, 8)), np.ones((10, 3)), 1.0), LoraShapeError,
         r"B has rank = 3 \(axis 1\), expected 2"),
        (lambda m: m.add_adapter("x", np.ones((2, 8)), np.ones((9, 2)), 1.0), LoraShapeError,
         r"B has out_features = 9"),
        (lambda m: m.add_adapter("x", np.ones((2, 8)), np.ones((10, 2)), 0.0), LoraConfigError, "alpha"),
        (lambda m: m.add_layer("x", LoraLinear(np.ones((10, 9)), 2, 1.0)), LoraShapeError,
         "expected 10x8"),
    ],
)
def test_bad_input(call, error, match, rng):
    multi, _, _ = build(rng, 10, 8, [2, 3], np.float64)
    names = multi.adapter_names
    with pytest.raises(error, match=match):
        call(multi)
    assert multi.adapter_names == names


# ------------------------------------------------- adapter ids: nothing wraps
@pytest.mark.parametrize(
    "ids, error, match",
    [
        ([0, 2**63, 1], LoraKeyError, r"adapter id 9223372036854775808 at row 1 is out of range"),
        ([0, 2**64 - 1, 1], LoraKeyError, r"adapter id 18446744073709551615 at row 1"),
        ([0, -2**63 - 1, 1], LoraKeyError, r"adapter id -9223372036854775809 at row 1"),
        ([0, 10**30, 1], LoraKeyError, "at row 1 is out of range"),
        ([0, np.uint64(2**64 - 1), 1], LoraKeyError, r"adapter id 18446744073709551615 at row 1"),
        (np.array([0, 2**64 - 1, 1], np.uint64), LoraKeyError,
         r"adapter id 18446744073709551615 at row 1 is out of range"),
        (np.array([0, 2**63, 1], np.uint64), LoraKeyError, "adapter id 9223372036854775808 at row 1"),
        (np.array([0, 255, 1], np.uint8), LoraKeyError, "adapter id 255 at row 1"),
        (np.array([0, -2, 1], np.int8), LoraKeyError, "adapter id -2 at row 1"),
        (np.array([0.0, 1.0, 1.0]), LoraTypeError, "must hold integer ids .* dtype float64"),
        (np.array([True, False, True]), LoraTypeError, "dtype bool"),
        (np.array([0, 1, 1], complex), LoraTypeError, "dtype complex128"),
        ([0, True, 1], LoraTypeError, r"adapter_ids\[1\] must be an int id, a name or None, got bool"),
        ([0, np.bool_(False), 1], LoraTypeError, r"adapter_ids\[1\] .* got bool"),
        ([0, 1.0, 1], LoraTypeError, r"adapter_ids\[1\] .* got float"),
        ([0, ["adapter0"], 1], LoraTypeError, r"adapter_ids\[1\] .* got list"),
        ([0, {"a"}, 1], LoraTypeError, r"adapter_ids\[1\] .* got set"),
        ([0, b"adapter0", 1], LoraTypeError, r"adapter_ids\[1\] .* got bytes"),
        (np.array(1), LoraShapeError, r"one entry per row of X \(3\), got shape \(\)"),
        (np.array("adapter0"), LoraTypeError, "must be a sequence"),
        (np.zeros((3, 1), np.int64), LoraShapeError, r"got shape \(3, 1\)"),
        (iter([0, 1, 1]), LoraTypeError, "must be a sequence"),
        (5, LoraTypeError, "must be a sequence"),
    ],
)
def test_bad_adapter_ids_never_wrap(ids, error, match, rng):
    multi, _, _ = build(rng, 10, 8, [2, 3], np.float64)
    with pytest.raises(error, match=match) as info:
        multi.forward_batch(np.ones((3, 8)), ids)
    assert isinstance(info.value, LoraError)


def test_valid_ids_in_every_integer_dtype(rng):
    multi, _, _ = build(rng, 10, 8, [2, 3], np.float64)
    X = rng.standard_normal((4, 8))
    want = multi.forward_batch(X, [1, 0, -1, 1])
    for dtype in (np.int8, np.int16, np.int32, np.int64):
        np.testing.assert_array_equal(multi.forward_batch(X, np.array([1, 0, -1, 1], dtype)), want)
    want_unsigned = multi.forward_batch(X, [1, 0, 0, 1])
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        np.testing.assert_array_equal(multi.forward_batch(X, np.array([1, 0, 0, 1], dtype)),
                                      want_unsigned)
    np.testing.assert_array_equal(multi.forward_batch(X, [np.int8(1), 0, None, np.uint64(1)]), want)
    np.testing.assert_array_equal(
        multi.forward_batch(X, np.array(["adapter1", "adapter0", None, "adapter1"], object)), want)
    np.testing.assert_array_equal(
        multi.forward_batch(X[:2], np.array(["adapter1", "adapter0"])), want[:2])


def test_unhashable_names(rng):
    multi, _, _ = build(rng, 10, 8, [2], np.float64)
    assert [1] not in multi
    for call in (lambda: multi.scaling([1]), lambda: multi.rank({}), lambda: multi.remove_adapter([1])):
        with pytest.raises(LoraKeyError, match="no adapter named"):
            call()
    assert multi.adapter_names == ["adapter0"]


@pytest.mark.parametrize(
    "path, error", [("fast", LoraConfigError), ("", LoraConfigError), (5, LoraTypeError),
                    (["rows"], LoraTypeError), (None, LoraTypeError)])
def test_bad_path(path, error, rng):
    multi, _, _ = build(rng, 10, 8, [2], np.float64)
    with pytest.raises(error, match="path must be 'auto', 'segmented' or 'rows'"):
        multi.forward_batch(np.ones((2, 8)), [0, 0], path=path)


# ------------------------------------------------------------ pickle and copy
def assert_same_multi(a, b):
    assert a.adapter_names == b.adapter_names and a.dtype == b.dtype
    for name in a.adapter_names:
        assert (a.rank(name), a.scaling(name)) == (b.rank(name), b.scaling(name))
    pa, pb = a._packed, b._packed
    assert pa.index == pb.index and pa.alphas == pb.alphas and pa.ranks == pb.ranks
    for x, y in [(a._W, b._W), (pa.A_cat, pb.A_cat), (pa.BT_cat, pb.BT_cat),
                 (pa.offsets, pb.offsets), (pa.scalings, pb.scalings)]:
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
        assert not np.shares_memory(x, y) and y.flags.c_contiguous
    assert a._lock is not b._lock


COPIERS = [copy.copy, copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))]


@pytest.mark.parametrize("copier", COPIERS, ids=["copy", "deepcopy", "pickle"])
def test_multi_pickles_and_copies(copier, dtype, rng):
    multi, _, _ = build(rng, 12, 9, [2, 4, 3], dtype, rslora=True)
    other = copier(multi)
    assert_same_multi(multi, other)
    X = rng.standard_normal((5, 9)).astype(dtype)
    ids = np.array([2, -1, 0, 1, 2])
    np.testing.assert_array_equal(other.forward_batch(X, ids), multi.forward_batch(X, ids))
    # Independent: changes to the copy leave the original alone, and back.
    before = multi.forward_batch(X, ids)
    other.remove_adapter("adapter0")
    other.add_adapter("new", np.ones((1, 9)), np.ones((12, 1)), alpha=1.0)
    multi.add_adapter("mine", np.ones((1, 9)), np.ones((12, 1)), alpha=2.0)
    assert other.adapter_names == ["adapter1", "adapter2", "new"]
    assert multi.adapter_names == ["adapter0", "adapter1", "adapter2", "mine"]
    np.testing.assert_array_equal(multi.forward_batch(X, ids), before)


def test_copies_and_the_original_run_side_by_side(rng):
    multi, _, _ = build(rng, 32, 16, [4, 2], np.float32)
    copies = [multi, copy.deepcopy(multi), pickle.loads(pickle.dumps(multi))]
    X = rng.standard_normal((9, 16)).astype(np.float32)
    ids = rng.integers(-1, 2, 9)
    want = multi.forward_batch(X, ids)
    results = [None] * 6
    barrier = threading.Barrier(6)

    def work(t):
        barrier.wait()
        target = copies[t % 3]
        for _ in range(10):
            results[t] = target.forward_batch(X, ids)
        if t < 3:
            target.add_adapter(f"t{t}", np.ones((1, 16)), np.ones((32, 1)), alpha=1.0)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for got in results:
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------- constructor types
def test_add_layer_and_add_adapter_types(rng):
    multi, _, _ = build(rng, 10, 8, [2], np.float64)
    before = copy.deepcopy(multi)
    for call, error, match in [
        (lambda: multi.add_layer("x", np.ones((10, 8))), LoraTypeError, "layer must be a LoraLinear"),
        (lambda: multi.add_layer(3, LoraLinear(np.ones((10, 8)), 2, 1.0)), LoraTypeError,
         "adapter name must be a non-empty string, got int"),
        (lambda: multi.add_adapter(["x"], np.ones((2, 8)), np.ones((10, 2)), 1.0), LoraTypeError,
         "adapter name"),
        (lambda: multi.add_adapter("", np.ones((2, 8)), np.ones((10, 2)), 1.0), LoraConfigError,
         "non-empty"),
        (lambda: multi.add_adapter("x", [[1.0] * 8, [1.0]], np.ones((10, 2)), 1.0), LoraDtypeError,
         "A must be an array of real numbers"),
        (lambda: multi.add_adapter("x", np.ones((2, 8)), np.ones((10, 2), complex), 1.0),
         LoraDtypeError, "B must hold real numbers"),
        (lambda: multi.add_adapter("x", np.ones((2, 8)), np.ones((10, 2)), 1.0, use_rslora="yes"),
         LoraTypeError, "use_rslora must be True or False"),
        (lambda: multi.add_adapter("x", np.ones((1, 8)), None, 1.0), LoraDtypeError,
         "B must hold real numbers"),
        (lambda: multi.forward_batch([[1.0] * 8, [1.0]], [0, 0]), LoraDtypeError,
         "X must be an array of real numbers"),
        (lambda: multi.forward_batch(np.ones((2, 8)), [0, 0], out=[0.0]), LoraTypeError,
         "out must be a numpy.ndarray"),
    ]:
        with pytest.raises(error, match=match):
            call()
    assert_same_multi(before, multi)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_scaling_that_overflows_float32_is_refused(rng):
    multi = MultiLoraLinear(np.ones((4, 4), np.float32))
    with pytest.raises(LoraConfigError, match="scaling of adapter 'big'"):
        multi.add_adapter("big", np.ones((1, 4)), np.ones((4, 1)), alpha=1e39)
    big = LoraLinear(np.ones((4, 4)), 1, 1e39)  # finite in float64
    with pytest.raises(LoraConfigError, match="scaling of adapter 'big'"):
        multi.add_layer("big", big)
    assert len(multi) == 0
