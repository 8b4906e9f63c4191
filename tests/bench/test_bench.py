"""The bench's machinery on its own: interleaving, the plan, the cases (tiny sizes)."""

import numpy as np
import pytest

from numba_lora import LoraConfigError
from numba_lora.bench import cases, timing


def test_interleaved_alternates_order_and_bounds_repeats():
    calls = []
    funcs = [lambda i=i: calls.append(i) for i in range(3)]
    medians, repeats = timing.interleaved(funcs, budget_s=0.0, min_repeats=4, max_repeats=10)
    assert repeats == 4 and len(medians) == 3 and all(m >= 0 for m in medians)
    # warm-up (twice each), one sizing round, then forward and reversed rounds
    assert calls[9:] == [0, 1, 2, 2, 1, 0, 0, 1, 2, 2, 1, 0]
    _, repeats = timing.interleaved(funcs, budget_s=10.0, max_repeats=7)
    assert repeats == 7


def test_interleaved_self_timed_gives_medians_per_step():
    medians, _ = timing.interleaved([lambda: (1.0, 3.0), lambda: (2.0, 4.0)], budget_s=0.0,
                                    self_timed=True)
    np.testing.assert_array_equal(medians[0], [1.0, 3.0])
    np.testing.assert_array_equal(medians[1], [2.0, 4.0])


def test_plan_order():
    plan = cases._plan([(8, 8)], [2], ["float32"], [1, 4], [None], merge=True, multi=True)
    assert [(op, batch) for _, op, _, _, _, batch in plan] == [
        ("forward", 1), ("forward", 4), ("merge", 0), ("multi_mixed", 512), ("multi_per_row", 64)]


def test_set_threads_restores():
    before = timing.current_threads()
    restore = timing.set_threads(1)
    assert timing.current_threads() == 1
    restore()
    assert timing.current_threads() == before


def test_merge_case_baseline_is_a_copy():
    merge, unmerge = cases.run_case("merge", (8, 12), 2, "float64", budget_s=0.0)
    assert (merge.op, unmerge.op) == ("merge", "unmerge")
    assert merge.baseline == "copy of W" and merge.repeats == 5


def test_unknown_case():
    with pytest.raises(LoraConfigError, match="op must be"):
        cases.run_case("transpose", (8, 8), 2, "float32", budget_s=0.0)
    with pytest.raises(LoraConfigError, match="quant"):
        cases.run(shapes=[(8, 8)], ranks=[2], batches=[1], quant="int8", progress=False)


def test_plan_with_nf4_and_training():
    plan = cases._plan([(8, 8)], [2], ["float32", "float64"], [1, 4], [None], merge=False,
                       multi=False, quant="nf4", train=True)
    ops = [(op, dtype, batch) for _, op, _, _, dtype, batch in plan]
    # NF4 rows only for float32 (QLoraLinear computes in float32).
    assert ("qlora", "float32", 4) in ops and not any(op == "qlora" and d == "float64"
                                                      for op, d, _ in ops)
    assert ("train", "float64", 1) in ops and ("train", "float32", 4) in ops


@pytest.mark.parametrize("batch", [1, 3])
def test_qlora_case_cycles_layers_and_reports_a_ratio(batch):
    (row,) = cases.run_case("qlora", (16, 64), 2, "float32", batch=batch, budget_s=0.0)
    assert row.op == "qlora_forward" and row.dtype == "nf4" and row.batch == batch
    assert row.baseline == "dense float32" and np.isfinite(row.ratio) and row.ratio > 0


def test_train_case_reports_a_ratio():
    (row,) = cases.run_case("train", (16, 24), 2, "float64", batch=3, budget_s=0.0)
    assert row.op == "train" and row.baseline == "X @ W.T and dY @ W"
    assert np.isfinite(row.ratio) and row.ratio > 0
