"""The command line: subcommands, --version, argument checks, and the bench on tiny sizes."""

import importlib.metadata
import json

import numba
import pytest

from numba_lora import bench
from numba_lora.__main__ import main

TINY = ["--shape", "16x24", "--budget", "0.01"]


def test_bench_json_and_table(capsys):
    code = main(["bench", *TINY, "--rank", "2,4", "--batch", "1,3", "--json", "-"])
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


def test_bench_json_file(tmp_path, capsys):
    path = tmp_path / "out.json"
    assert main(["bench", *TINY, "--rank", "2", "--batch", "2", "--no-merge", "--no-multi",
                 "--dtype", "float64", "--threads", "1", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["results"]
    assert [(r["op"], r["dtype"], r["threads"]) for r in rows] == [("forward_batch", "float64", 1)]
    assert "lora/base" in capsys.readouterr().out


@pytest.mark.parametrize("args", [
    ["--shape", "8x8", "--rank", "16"],          # rank above min(out, in)
    ["--shape", "8x32", "--rank", "9"],
    ["--rank", "0"],
    ["--rank", "4,x"],
    ["--batch", "0"],
    ["--budget", "0"],
    ["--budget", "-1"],
    ["--budget", "nan"],
    ["--budget", "soon"],
    ["--threads", "0"],
    ["--threads", str(numba.config.NUMBA_NUM_THREADS + 1)],
    ["--shape", "16by24"],
    ["--shape", "16x24x2"],
    ["--shape", "0x24"],
    ["--dtype", "float16"],
    ["--dtype", "float32,int8"],
    ["--json", "/no/such/folder/out.json"],
    ["--shape", "1000000x1000000", "--rank", "1"],  # a weight larger than the machine's memory
])
def test_bench_bad_arguments_are_usage_errors(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("python -m numba_lora bench: error: argument")


def test_bench_main_alone_checks_the_same(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--shape", "8x8", "--rank", "16"])
    assert exit_info.value.code == 2
    assert "exceeds min(OUT, IN) = 8" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["frobnicate"], "invalid choice"),
    (["bench", "--frobnicate"], "unrecognized arguments"),
    (["--threads", "2"], "--threads is an option of 'bench' and 'merge': it goes after the "
                         "command (python -m numba_lora bench --threads ...)"),
    (["--budget=2"], "--budget is an option of 'bench':"),
    (["--no-sync", "merge"], "--no-sync is an option of 'merge':"),
    (["--frobnicate"], "unrecognized argument --frobnicate (the demo takes no options)"),
])
def test_unknown_command_or_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_help(capsys):
    for argv in (["--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "bench" in out and "--budget" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"numba_lora {importlib.metadata.version('numba_lora')}\n"


def test_version_without_metadata(monkeypatch):
    import numba_lora
    from numba_lora import __main__

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert __main__.version() == numba_lora.__version__


def test_table_format():
    results = bench.run_case("forward", (8, 8), 2, "float64", batch=2, budget_s=0.01)
    text = bench.format_table(results)
    assert "forward_batch" in text and "8x8" in text
    assert " 0.000 ms" not in text  # tiny times read in us, not as zero


@pytest.mark.parametrize("seconds, text", [
    (2.5e-7, "0.250 us"), (4.5e-6, "4.500 us"), (0.0123, "12.30 ms"), (0.99996e-3, "1.000 ms"),
    (0.5, "500.0 ms"), (2.0, "2.000 s"),
])
def test_format_time(seconds, text):
    assert bench.format_time(seconds) == text
