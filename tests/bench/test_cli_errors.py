"""``python -m numba_lora bench`` and the top level: every bad argument is a usage error.

A usage error is one line on stderr naming the option, exit code 2, no
traceback, and nothing timed or written.
"""

import numba
import pytest

from numba_lora.__main__ import main

TOO_MANY = str(numba.config.NUMBA_NUM_THREADS + 1)


def usage_error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    assert info.value.code == 2
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    return captured.err


@pytest.mark.parametrize("args,match", [
    (["--rank", "0"], "--rank: must be >= 1, got 0"),
    (["--rank", "-3"], "--rank: must be >= 1, got -3"),
    (["--rank", "x"], "--rank: expected comma-separated integers, got 'x'"),
    (["--rank", "4,,8"], "--rank: expected comma-separated integers"),
    (["--rank", "16", "--shape", "8x8"], "rank 16 exceeds min(OUT, IN) = 8 of shape 8x8"),
    (["--threads", "0"], "--threads: must be >= 1, got 0"),
    (["--threads", TOO_MANY], f"{TOO_MANY} threads is more than NUMBA_NUM_THREADS"),
    (["--threads", "999"], "999 threads is more than NUMBA_NUM_THREADS"),
    (["--threads", "abc"], "--threads: expected comma-separated integers"),
    (["--shape", "8x"], "shape must look like 4096x4096, got '8x'"),
    (["--shape", "0x8"], "shape must be positive, got '0x8'"),
    (["--shape=-8x8"], "shape must be positive, got '-8x8'"),
    (["--shape", "1e9x1e9"], "shape must look like 4096x4096"),
    (["--shape", "100000000x100000000"], "more than this machine's"),
    (["--batch", "0"], "--batch: must be >= 1"),
    (["--batch", "1.5"], "--batch: expected comma-separated integers"),
    (["--dtype", "float16"], "dtype must be float32 or float64, got 'float16'"),
    (["--budget", "0"], "--budget: must be finite and > 0"),
    (["--budget", "nan"], "--budget: must be finite and > 0"),
    (["--budget", "inf"], "--budget: must be finite and > 0"),
    (["--quant", "nf8"], "invalid choice: 'nf8'"),
    (["--quant", "nf4", "--dtype", "float64"], "--quant: NF4 layers are float32 only; --dtype float64 would time none"),
    (["--json", "/nonexistent-dir-numba-lora/x.json"], "no such directory"),
    (["--unknown"], "unrecognized arguments: --unknown"),
    (["extra"], "unrecognized arguments: extra"),
])
def test_bench_usage_errors(args, match, capsys):
    err = usage_error(["bench", *args], capsys)
    assert match in err


def test_bench_json_into_a_directory_or_a_file_as_folder(tmp_path, capsys):
    # Refused before the minutes of timing, not when the file is opened at the end.
    err = usage_error(["bench", "--json", str(tmp_path)], capsys)
    assert "is a directory; give a file path" in err
    afile = tmp_path / "afile"
    afile.write_text("")
    err = usage_error(["bench", "--json", str(afile / "x.json")], capsys)
    assert "no such directory" in err


@pytest.mark.parametrize("argv,match", [
    (["--bogus"], "unrecognized argument --bogus (the demo takes no options)"),
    (["--threads", "2"], "--threads is an option of 'bench' and 'merge'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_top_level_usage_errors(argv, match, capsys):
    assert match in usage_error(argv, capsys)
