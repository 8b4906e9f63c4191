"""The command line: demo dispatch and the bench command on tiny sizes."""

import json

import pytest

from numba_lora import bench
from numba_lora.__main__ import main


def test_bench_json_and_table(capsys):
    code = main(["bench", "--shape", "16x24", "--rank", "2,4", "--batch", "1,3",
                 "--budget", "0.01", "--json", "-"])
    assert code == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    rows = report["results"]
    ops = [(r["op"], r["rank"], r["batch"]) for r in rows]
    assert ops == [("forward", 2, 1), ("forward_batch", 2, 3), ("merge", 2, 0), ("unmerge", 2, 0),
                   ("multi_mixed", 2, 512), ("multi_per_row", 2, 64),
                   ("forward", 4, 1), ("forward_batch", 4, 3), ("merge", 4, 0), ("unmerge", 4, 0),
                   ("multi_mixed", 4, 512), ("multi_per_row", 4, 64)]
    assert {r["baseline"] for r in rows} >= {"dense", "copy of W"}
    for r in rows:
        assert r["numba_lora_s"] > 0 and r["dense_s"] > 0
        assert r["ratio"] == pytest.approx(r["numba_lora_s"] / r["dense_s"])
    assert "lora/base" in captured.err  # table goes to stderr when JSON goes to stdout
    assert report["machine"]["numba"]


def test_bench_rejects_bad_options(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--shape", "16by24"])
    with pytest.raises(SystemExit):
        main(["bench", "--dtype", "float16"])
    assert "float32 or float64" in capsys.readouterr().err


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main(["--help"]) == 0


def test_table_format():
    results = bench.run_case("forward", (8, 8), 2, "float64", batch=2, budget_s=0.01)
    text = bench.format_table(results)
    assert "forward_batch" in text and "8x8" in text
