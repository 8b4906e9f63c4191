"""docs/bench/decode_ratios.py runs at tiny sizes and prints one line per run and row count."""

import pathlib
import re
import runpy
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "docs" / "bench" / "decode_ratios.py"
pytestmark = pytest.mark.skipif(not SCRIPT.is_file(), reason="docs/bench is not shipped here")


@pytest.mark.parametrize("extra, names", [
    ([], ["LoraLinear.forward", "kernels.forward_stacked", "LoraLinear.forward_batch"]),
    (["--dtype", "float64"], ["LoraLinear.forward", "LoraLinear.forward_batch"]),
    (["--nf4"], ["QLoraLinear.forward", "kernels.forward_nf4", "QLoraLinear.forward_batch"]),
])
def test_decode_ratios_script(monkeypatch, capsys, extra, names):
    argv = [str(SCRIPT), "--runs", "1", "--rows", "1", "3", "--layers", "2", "--rounds", "3",
            "--shape", "24x64", "--rank", "4", *extra]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(SCRIPT), run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[1] for line in lines] == ["1", "3"]
    for name in names:
        assert any(re.search(rf"{re.escape(name)} \d+\.\d+x", line) for line in lines), name


def test_decode_ratios_script_refuses_nf4_float64(monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--nf4", "--dtype", "float64"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert exit_.value.code == 2
