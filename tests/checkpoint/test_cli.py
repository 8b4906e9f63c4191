"""``python -m numba_lora merge``: exit codes, messages, options."""

import subprocess
import sys

import pytest

from numba_lora.__main__ import main

from .helpers import FIXTURES, checkpoint_tensors, raw_tensors


def test_merge_command(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["merge", str(FIXTURES / "llama_bf16"), str(FIXTURES / "llama_adapter"), str(out),
                 "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"merged 14 tensors into {out}: 6 shard(s)")
    peft = raw_tensors(FIXTURES / "llama_bf16_merged.safetensors")
    assert checkpoint_tensors(out) == peft


def test_refusal_is_one_line_and_exit_code_1(tmp_path, capsys):
    code = main(["merge", str(FIXTURES / "llama_bf16"), str(FIXTURES / "gpt2_adapter"),
                 str(tmp_path / "out")])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m numba_lora merge: error: ")
    assert "transformer.h.0.attn.c_attn" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,match", [
    (["--dtype", "float16"], "invalid choice"),
    (["--threads", "0"], "must be between 1"),
    (["--threads", "x"], "expected an integer"),
])
def test_usage_errors(tmp_path, capsys, args, match):
    with pytest.raises(SystemExit) as info:
        main(["merge", "a", "b", str(tmp_path / "out"), *args])
    assert info.value.code == 2
    assert match in capsys.readouterr().err


def test_in_a_fresh_process_with_threads(tmp_path):
    # --threads sets the process's thread counts: run it where that cannot leak.
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "numba_lora", "merge", str(FIXTURES / "gpt2_f32"),
                             str(FIXTURES / "gpt2_adapter"), str(out), "--threads", "1"],
                            capture_output=True, text=True, check=True)
    assert result.stdout.startswith("merged 8 tensors")
    assert checkpoint_tensors(out) == raw_tensors(FIXTURES / "gpt2_f32_merged.safetensors")
    result = subprocess.run([sys.executable, "-m", "numba_lora", "merge", "--help"],
                            capture_output=True, text=True, check=True)
    assert "BASE_DIR ADAPTER_DIR [ADAPTER_DIR ...]" in result.stdout and "OUT_DIR" in result.stdout


def test_weighted_merge_command(tmp_path, capsys):
    import hashlib
    import json
    from pathlib import Path

    weighted = Path(__file__).resolve().parents[1] / "fixtures" / "peft_weighted"
    spec = json.loads((weighted / "expected.json").read_text())["cases"]["cat_d_c_bf16"]
    out = tmp_path / "out"
    code = main(["merge", str(FIXTURES / "llama_bf16"), str(weighted / "adapter_d"),
                 str(weighted / "adapter_c"), str(out), "--weights", "0.5", "1.5",
                 "--combination", "cat", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith(f"merged 8 tensors into {out}")
    assert {name: hashlib.sha256(data).hexdigest()
            for name, (_, _, data) in checkpoint_tensors(out).items()} == spec["sha256"]


def test_several_adapters_need_weights(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["merge", str(FIXTURES / "llama_bf16"), str(FIXTURES / "llama_adapter"),
              str(FIXTURES / "gpt2_adapter"), str(tmp_path / "out")])
    assert info.value.code == 2
    assert "2 adapters need --weights" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _usage_error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_paths_are_usage_errors(tmp_path, capsys):
    base, adapter = str(FIXTURES / "gpt2_f32"), str(FIXTURES / "gpt2_adapter")
    afile = tmp_path / "afile"
    afile.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    cases = [
        ([str(tmp_path / "missing"), adapter, str(tmp_path / "o")],
         "argument BASE_DIR: '" + str(tmp_path / "missing") + "' does not exist"),
        ([str(afile), adapter, str(tmp_path / "o")], "argument BASE_DIR: '" + str(afile) + "' is a file"),
        ([base, str(tmp_path / "missing"), str(tmp_path / "o")], "argument ADAPTER_DIR: "),
        ([base, str(afile), str(tmp_path / "o")], "is a file; expected a directory"),
        ([base, adapter, str(afile)], "argument OUT_DIR: '" + str(afile) + "' is a file"),
        ([base, adapter, str(full)], "is not empty; give a new or empty directory"),
    ]
    for argv, match in cases:
        assert match in _usage_error(["merge", *argv, "--no-progress"], capsys)
    assert afile.read_text() == "x" and sorted(p.name for p in full.iterdir()) == ["keep.txt"]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("weights,match", [
    (["nan"], "--weights: must be a finite number, got 'nan'"),
    (["inf"], "--weights: must be a finite number, got 'inf'"),
    (["1", "2"], "--weights: 2 weight(s) for 1 adapter(s); give one each"),
])
def test_weights_are_usage_errors(tmp_path, capsys, weights, match):
    argv = ["merge", str(FIXTURES / "gpt2_f32"), str(FIXTURES / "gpt2_adapter"),
            str(tmp_path / "out"), "--weights", *weights]
    assert match in _usage_error(argv, capsys)
    assert not (tmp_path / "out").exists()


def test_weights_before_the_directories_say_how_to_separate(tmp_path, capsys):
    err = _usage_error(["merge", "--weights", "1", "a", "b", "c"], capsys)
    assert "expected a number, got 'a' (give --weights after the directories" in err


def test_merge_command_no_sync(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["merge", str(FIXTURES / "llama_bf16"), str(FIXTURES / "llama_adapter"), str(out),
                 "--no-progress", "--no-sync"])
    assert code == 0
    assert checkpoint_tensors(out) == raw_tensors(FIXTURES / "llama_bf16_merged.safetensors")
