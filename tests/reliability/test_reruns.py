"""Issue 8, items 3-6 end to end: reruns never silently ignore new settings, resume never
unpickles, a corrupt newest checkpoint falls back, a diverged run leaves only good
checkpoints.

Every test copies one finished 2-step ``fam train adapt`` run (the ``finished_run``
fixture) and runs the command again the way a user would.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest
from reliability_helpers import adapt_args, copy

from fam.train import checkpoints as ckpt


def _mtime(run: Path) -> int:
    return (run / "model" / "model.safetensors").stat().st_mtime_ns


def _record(run: Path) -> dict:
    return json.loads((run / "model" / "fam_config.json").read_text())


def _steps(run: Path) -> list[str]:
    return [d.name for d in ckpt.list_checkpoints(run / "checkpoints")]


# ---------------------------------------------------------------- same run
def test_model_and_checkpoints_record_the_resolved_config(finished_run, tiny):
    rec = _record(finished_run)
    assert rec["stage"] == "adapt" and rec["steps"] == 2 and rec["world_size"] == 1
    assert rec["config"]["model"] == str(tiny.resolve()) and rec["config"]["optim"]["steps"] == 2
    state = json.loads((finished_run / "checkpoints" / "step-2" / "state.json").read_text())
    assert state["config"] == rec["config"] and state["world_size"] == 1


def test_bookkeeping_changes_are_the_same_run(finished_run, tiny, scenes, tmp_path, cli):
    run = copy(finished_run, tmp_path / "run")
    before = _mtime(run)
    relative = os.path.relpath(tiny)  # the same model through another spelling of its path
    rc, _, text = cli(*adapt_args(relative, scenes, run, "run.threads=1", "run.log_every=7",
                                  "run.save_every=0", "run.keep_checkpoints=3",
                                  "run.num_workers=0", "run.device=cpu",
                                  "run.check_images=exists"))
    assert rc == 0 and "already holds the model of this run; skipping" in text
    assert _mtime(run) == before


# ---------------------------------------------------------------- more steps
def test_more_steps_on_a_finished_run_is_refused_and_says_how_to_extend(finished_run, tiny,
                                                                        scenes, tmp_path,
                                                                        cli):
    run = copy(finished_run, tmp_path / "run")
    before = _mtime(run)
    rc, _, text = cli(*adapt_args(tiny, scenes, run, "optim.steps=3"))
    assert rc == 2 and "skipping" not in text
    assert "holds a finished adapt run with other settings" in cli.error
    assert "optim.steps: 2 -> 3" in cli.error
    assert "--extend (run.on_change=extend)" in cli.error and "--restart" in cli.error
    assert _mtime(run) == before and _steps(run) == ["step-1", "step-2"]


def test_extend_continues_from_the_last_checkpoint_to_the_new_steps(finished_run, tiny,
                                                                    scenes, tmp_path, cli):
    run = copy(finished_run, tmp_path / "run")
    rc, _, text = cli(*adapt_args(tiny, scenes, run, "optim.steps=3", "--extend"))
    assert rc == 0 and "resumed from" in text and "step-2 (step 2)" in text
    assert _record(run)["steps"] == 3 and _record(run)["config"]["optim"]["steps"] == 3
    assert json.loads((run / "train_metrics.json").read_text())["steps"] == 3
    assert _steps(run)[-1] == "step-3"
    # extended once, it is the same run again
    rc, _, text = cli(*adapt_args(tiny, scenes, run, "optim.steps=3"))
    assert rc == 0 and "skipping" in text


def test_extend_allows_only_a_higher_step_count(finished_run, tiny, scenes, tmp_path, cli):
    run = copy(finished_run, tmp_path / "run")
    for extra, says in ((["optim.steps=3", "optim.lr=1e-3"], "optim.lr: 0.0002 -> 0.001"),
                        (["optim.steps=1"], "optim.steps: 2 -> 1")):
        rc, _, _ = cli(*adapt_args(tiny, scenes, run, *extra, "--extend"))
        assert rc == 2 and says in cli.error and "--extend only raises optim.steps" in cli.error


# ---------------------------------------------------------------- other settings
@pytest.mark.parametrize("change", ["model", "train_dir", "run.seed", "optim.batch_size",
                                    "optim.lr", "vein.enabled"])
def test_other_settings_are_refused_with_the_differing_keys(change, finished_run, tiny,
                                                            scenes, tmp_path, cli):
    run = copy(finished_run, tmp_path / "run")
    model, data, extra = tiny, scenes, []
    if change == "model":
        model = copy(tiny, tmp_path / "other-model")
    elif change == "train_dir":
        data = copy(scenes, tmp_path / "other-data")
    else:
        extra = [{"run.seed": "run.seed=1", "optim.batch_size": "optim.batch_size=2",
                  "optim.lr": "optim.lr=1e-3", "vein.enabled": "vein.enabled=true"}[change]]
    rc, _, _ = cli(*adapt_args(model, data, run, *extra))
    # the batch is per process: what is compared is the global batch
    key = "global batch (optim.batch_size x processes): 4 -> 2" \
        if change == "optim.batch_size" else f"{change}: "
    assert rc == 2 and key in cli.error
    assert "Nothing was changed" in cli.error and "--restart" in cli.error
    assert _steps(run) == ["step-1", "step-2"]


def test_an_interrupted_run_is_not_resumed_with_other_settings(finished_run, tiny, scenes,
                                                               tmp_path, cli):
    run = copy(finished_run, tmp_path / "run")
    (run / "model" / "config.json").unlink()  # as if stopped before the export
    rc, _, _ = cli(*adapt_args(tiny, scenes, run, "optim.lr=1e-3"))
    assert rc == 2 and "holds an unfinished adapt run" in cli.error
    assert "optim.lr: 0.0002 -> 0.001" in cli.error
    # the same settings finish it (export from the last checkpoint, no further step)
    rc, _, _ = cli(*adapt_args(tiny, scenes, run))
    assert rc == 0 and (run / "model" / "config.json").exists()


def test_the_global_batch_counts_not_the_number_of_processes(finished_run, tiny, scenes,
                                                              tmp_path, cli):
    # optim.batch_size is per process: as if the run had used 2 processes of 4 pairs each
    run = copy(finished_run, tmp_path / "run")
    for p in [run / "model" / "fam_config.json", *run.glob("checkpoints/*/state.json")]:
        rec = json.loads(p.read_text())
        rec["world_size"] = 2
        p.write_text(json.dumps(rec))
    rc, _, _ = cli(*adapt_args(tiny, scenes, run))  # 1 process of 4: half the global batch
    assert rc == 2
    assert "global batch (optim.batch_size x processes): 8 -> 4" in cli.error
    rc, _, text = cli(*adapt_args(tiny, scenes, run, "optim.batch_size=8"))  # 1 x 8 = 2 x 4
    assert rc == 0 and "skipping" in text


def test_a_record_written_before_a_field_existed_counts_it_as_its_default(
        finished_run, tiny, scenes, tmp_path, cli):
    # A field added to fam later (here: pretend mask_duplicates and lora.use_dora were
    # new) is absent from older records: at its default it is the same run; set to
    # something else it is a difference.
    run = copy(finished_run, tmp_path / "run")
    for p in [run / "model" / "fam_config.json", *run.glob("checkpoints/*/state.json")]:
        rec = json.loads(p.read_text())
        del rec["config"]["mask_duplicates"], rec["config"]["lora"]["use_dora"]
        del rec["world_size"]  # older records did not say either
        p.write_text(json.dumps(rec))
    rc, _, text = cli(*adapt_args(tiny, scenes, run))
    assert rc == 0 and "skipping" in text
    rc, _, _ = cli(*adapt_args(tiny, scenes, run, "mask_duplicates=false"))
    assert rc == 2 and "mask_duplicates: true -> false" in cli.error


def test_restart_and_resume_false_start_over_without_leftovers(finished_run, tiny, scenes,
                                                               tmp_path, cli):
    run = copy(finished_run, tmp_path / "run")
    rc, _, _ = cli(*adapt_args(tiny, scenes, run, "optim.lr=1e-3", "optim.steps=1",
                               "--restart"))
    assert rc == 0 and _record(run)["config"]["optim"]["lr"] == 1e-3
    assert _steps(run) == ["step-1"]  # the old run's step-2 is gone, not mixed in
    rc, _, _ = cli(*adapt_args(tiny, scenes, run, "optim.steps=1", "run.resume=false"))
    assert rc == 0 and _record(run)["config"]["optim"]["lr"] == 2e-4
    assert _steps(run) == ["step-1"]


# ---------------------------------------------------------------- resume safety
class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))  # would run at unpickling time


def test_a_crafted_pickle_in_a_run_folder_never_runs(finished_run, tiny, scenes, tmp_path,
                                                     cli):
    run = copy(finished_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    evil = run / "checkpoints" / "step-2" / "optimizer.pt"
    evil.write_bytes(pickle.dumps({"optimizer": _Payload(str(marker))}))
    rc, _, text = cli(*adapt_args(tiny, scenes, run, "optim.steps=3", "--extend"))
    assert not marker.exists()  # the restricted unpickler refused the object
    assert rc == 0 and f"skipping checkpoint {run / 'checkpoints' / 'step-2'}" in text
    assert "optimizer.pt: unreadable or not a fam checkpoint" in text
    assert "resumed from" in text and "step-1 (step 1)" in text


@pytest.mark.parametrize("victim", ["trainable.safetensors", "state.json", "optimizer.pt"])
def test_a_corrupt_newest_checkpoint_falls_back_with_a_warning(victim, finished_run, tiny,
                                                               scenes, tmp_path, cli):
    run = copy(finished_run, tmp_path / "run")
    bad = run / "checkpoints" / "step-2" / victim
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) // 2])  # truncated
    rc, _, text = cli(*adapt_args(tiny, scenes, run, "optim.steps=3", "--extend"))
    assert rc == 0
    assert f"skipping checkpoint {run / 'checkpoints' / 'step-2'}" in text and victim in text
    assert "step-1 (step 1)" in text and _steps(run)[-1] == "step-3"


# ---------------------------------------------------------------- divergence
def test_divergence_stops_with_one_line_and_leaves_only_good_checkpoints(tiny, scenes,
                                                                        tmp_path, cli):
    """optim.lr=1e6: step 2 has a finite loss and a NaN gradient. The optimizer never
    steps on it, the one line names a checkpoint that exists, and every checkpoint on disk
    is finite and resumes (the rerun resumes from it and stops the same way)."""
    run = tmp_path / "run"
    argv = adapt_args(tiny, scenes, run, "optim.lr=1e6", "optim.steps=6")
    rc, _, _ = cli(*argv)
    assert rc == 2 and "the optimizer did not step" in cli.error
    named = re.search(r"[Ll]ast good checkpoint: (\S+)", cli.error).group(1)
    assert Path(named).is_dir() and Path(named) in ckpt.list_checkpoints(run / "checkpoints")
    for d in ckpt.list_checkpoints(run / "checkpoints"):
        ckpt.read_checkpoint(d)  # raises on any non-finite tensor or unreadable file
    first = cli.error
    rc, _, text = cli(*argv)
    assert rc == 2 and f"resumed from {named}" in text and cli.error == first


# ---------------------------------------------------------------- experiments
def test_experiments_refuse_a_folder_made_with_other_settings(tmp_path, cli):
    from fam.experiments.ablation import plan_for_size
    from fam.experiments.demo import demo_config
    from fam.experiments.pipeline import start_experiment
    from fam.experiments.projector_compare import compare_config

    # What `fam demo --quick --seed 0` records first, before any work.
    demo = tmp_path / "demo"
    start_experiment(demo_config(quick=True), demo, "demo", {"seed": 0})
    rc, _, _ = cli("demo", "--quick", "--seed", "1", "--out", demo, "--no-progress")
    assert rc == 2 and "holds a demo run with other settings" in cli.error
    assert "seed: 0 -> 1" in cli.error and "use another --out" in cli.error
    rc, _, _ = cli("demo", "--seed", "0", "--out", demo, "--no-progress")  # full vs --quick
    assert rc == 2 and "config." in cli.error
    assert sorted(p.name for p in demo.iterdir()) == ["experiment.json"]  # nothing else made

    ablate = tmp_path / "ablate"
    start_experiment(plan_for_size("quick"), ablate, "ablate")
    rc, _, _ = cli("ablate", "--out", ablate, "--size", "small", "--seeds", "0")
    assert rc == 2 and "holds a ablate run with other settings" in cli.error
    rc, _, _ = cli("demo", "--quick", "--out", ablate, "--no-progress")
    assert rc == 2 and "holds a 'ablate' experiment, not 'demo'" in cli.error

    cmp = tmp_path / "cmp"
    start_experiment(compare_config(quick=True), cmp, "projector-compare")
    rc, _, _ = cli("projector-compare", "--out", cmp, "--no-progress")
    assert rc == 2 and "holds a projector-compare run with other settings" in cli.error
