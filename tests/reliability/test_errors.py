"""Issue 8, item 9: a user mistake outside fam's own checks is one line (exit 2), never a
traceback; a traceback only with --debug or FAM_DEBUG=1; a bug says "internal error".

Models and paths are broken the ways the issue lists; each command runs in-process
through ``fam.cli.main`` (the ``cli`` fixture asserts no traceback was printed or logged),
and two runs go through a real subprocess to test the exit path itself.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reliability_helpers import adapt_args, copy
from safetensors.torch import load_file, save_file

from fam.cli import main


def _broken(tiny: Path, tmp: Path, how: str) -> Path:
    """A copy of the tiny model broken as ``how`` says."""
    if how == "missing folder":
        return tmp / "no-such-model"
    if how == "hub id offline":
        return Path("NoSuchOrg/no-such-model")  # not a folder here: read as a hub id
    if how == "a file":
        return tiny / "config.json"
    m = copy(tiny, tmp / how.replace(" ", "_"))
    cfg = json.loads((m / "config.json").read_text())
    if how == "invalid config.json":
        (m / "config.json").write_text('{"model_type": "qwen2_vl",\n  "text_config": {,}\n')
    elif how == "no model_type":
        del cfg["model_type"]
        (m / "config.json").write_text(json.dumps(cfg))
    elif how == "incomplete config.json":
        # Without its sizes the config describes a 70B-parameter default model: loading it
        # used to allocate until the process was killed.
        del cfg["text_config"]
        (m / "config.json").write_text(json.dumps(cfg))
    elif how == "missing weights":
        (m / "model.safetensors").unlink()
    elif how == "truncated weights":
        data = (m / "model.safetensors").read_bytes()
        (m / "model.safetensors").write_bytes(data[:len(data) // 2])
    elif how == "NaN weights":
        w = load_file(str(m / "model.safetensors"))
        # Not the LM head: embedding-only loading never reads it (fam.backbones.headless).
        name = sorted(k for k in w if "lm_head." not in k)[0]
        w[name] = torch.full_like(w[name], float("nan"))
        save_file(w, str(m / "model.safetensors"), metadata={"format": "pt"})
    elif how == "missing tokenizer files":
        for f in m.glob("tokenizer*"):
            f.unlink()
    return m


MODEL_CASES = {  # how -> what the one line must say (besides the path)
    "missing folder": "model folder not found",
    "hub id offline": "no local folder of that name, and the hub model cannot be read",
    "a file": "is a file; give the checkpoint folder",
    "invalid config.json": "config.json, line 2: invalid JSON",
    "no model_type": "config.json, field 'model_type'",
    "incomplete config.json": "config.json: config.json describes a model of",
    "missing weights": "no weights (model.safetensors)",
    "truncated weights": "model.safetensors: truncated or corrupt weights file",
    "NaN weights": "the weights hold NaN or inf",
    "missing tokenizer files": "the tokenizer is empty",
}


@pytest.mark.parametrize("how", list(MODEL_CASES))
def test_broken_model_is_one_line_naming_the_file(how, tiny, scenes, tmp_path, cli):
    model = _broken(tiny, tmp_path, how)
    rc, _, _ = cli("eval", "--model", model, "--data", scenes / "eval", "--image-root", scenes,
                   "--datasets", "Scenes-Count", "--max-rows", "1", "--no-progress",
                   "--out", tmp_path / "res.json")
    assert rc == 2
    assert MODEL_CASES[how] in cli.error
    assert str(model).split("/")[-1] in cli.error  # names the folder or file
    assert not (tmp_path / "res.json").exists()
    assert not (tmp_path / "no-such-model").exists()  # nothing created for a missing model


def test_training_from_a_nan_model_is_refused_before_training(tiny, scenes, tmp_path, cli):
    model = _broken(tiny, tmp_path, "NaN weights")
    rc, _, _ = cli(*adapt_args(model, scenes, tmp_path / "run"))
    assert rc == 2 and "NaN or inf" in cli.error and not (tmp_path / "run" / "checkpoints").exists()


def test_invalid_captions_json_names_the_file_and_line(tiny, scenes, tmp_path, cli):
    caps = tmp_path / "captions.json"
    caps.write_text('[{"image": "a.png", "caption": "x"},\n {"image": }]\n')
    rc, _, _ = cli("train", "stage0", f"model={tiny}", f"captions={caps}",
                   f"run.out_dir={tmp_path / 's0'}", "run.progress=false")
    assert rc == 2 and "captions.json, line 2: invalid JSON" in cli.error


@pytest.mark.parametrize("where", ["a folder", "under a file"])
def test_output_paths_that_cannot_be_files(where, tiny, scenes, tmp_path, cli):
    out = tmp_path if where == "a folder" else scenes / "captions.json" / "res.json"
    rc, _, _ = cli("eval", "--model", tiny, "--data", scenes / "eval", "--image-root", scenes,
                   "--max-rows", "1", "--no-progress", "--out", out)
    assert rc == 2 and "--out=" in cli.error
    assert ("is a folder; give a file path" if where == "a folder" else "is a file") in cli.error


def test_run_out_dir_that_is_a_file_or_unwritable(tiny, scenes, tmp_path, cli):
    rc, _, _ = cli(*adapt_args(tiny, scenes, scenes / "captions.json"))
    assert rc == 2 and "run.out_dir=" in cli.error and "is a file; give a folder" in cli.error
    # Unwritable: a folder without write permission, or (as root, who may write anywhere)
    # a place no one can create folders in.
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    target = locked / "run" if os.geteuid() != 0 else Path("/proc/fam-test-run")
    try:
        rc, _, _ = cli(*adapt_args(tiny, scenes, target))
    finally:
        locked.chmod(0o700)
    assert rc == 2 and "cannot write there" in cli.error and "run.out_dir" in cli.error


def test_an_oserror_on_a_named_path_is_one_line(tmp_path, cli):
    # `fam model tiny` has no up-front check: the CLI's handler turns the OSError naming
    # the path into one line (exit 2) with what to do.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, _ = cli("model", "tiny", "--out", blocker / "tiny", "--size", "xs")
    assert rc == 2 and str(blocker) in cli.error and "is a file, not a folder" in cli.error


def test_bad_numbers_on_the_command_line_are_refused_by_the_parser(capsys):
    for argv in (["eval", "--model", "m", "--data", "d", "--batch-size", "0"],
                 ["encode", "--model", "m", "--input", "i", "--out", "o", "--batch-size", "-1"],
                 ["demo", "--threads", "x"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and f"argument {argv[-2]}" in err


def test_a_bug_is_an_internal_error_and_debug_shows_the_traceback(monkeypatch, cli, caplog):
    import fam.cli.infer

    def boom(args):
        return 1 // 0  # a genuine bug, not a user mistake
    monkeypatch.setattr(fam.cli.infer, "cmd_eval", boom)
    rc, _, _ = cli("eval", "--model", "m", "--data", "d")
    assert rc == 1
    assert "internal error: ZeroDivisionError" in cli.error and "--debug" in cli.error
    for argv, env in ((["--debug", "eval", "--model", "m", "--data", "d"], None),
                      (["eval", "--model", "m", "--data", "d", "--debug"], None),
                      (["eval", "--model", "m", "--data", "d"], "1")):
        if env:
            monkeypatch.setenv("FAM_DEBUG", env)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert main(argv) == 1
        assert any(r.exc_info for r in caplog.records), argv  # the traceback, on request
    monkeypatch.delenv("FAM_DEBUG")


def test_interrupt_says_how_to_resume(monkeypatch, cli):
    import fam.cli.infer

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(fam.cli.infer, "cmd_eval", interrupted)
    rc, _, _ = cli("eval", "--model", "m", "--data", "d")
    assert rc == 130 and "rerun the same command to resume" in cli.error


@pytest.mark.slow
def test_exit_path_of_the_real_command(tmp_path):
    """Through a real process: exit code 2, one ERROR line on stderr, no traceback; with
    FAM_DEBUG=1 the traceback is printed too."""
    argv = [sys.executable, "-m", "fam", "eval", "--model", str(tmp_path / "nope"), "--data",
            str(tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("FAM_DEBUG", None)
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    errors = [ln for ln in lines if " ERROR " in ln]
    assert len(errors) == 1 and "nope: model folder not found" in errors[0]
    p = subprocess.run(argv, capture_output=True, text=True, env={**env, "FAM_DEBUG": "1"},
                       timeout=300)
    assert p.returncode == 2 and "Traceback" in p.stderr
