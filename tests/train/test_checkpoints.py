"""Checkpoints: never unpickled, never non-finite, corrupt ones skipped, durable, readable."""
from __future__ import annotations

import math
import os
import pickle
import stat

import pytest
import torch

from fam.train import checkpoints as ckpt
from fam.train.trainer import TrainingDiverged
from fam.utils.checkpoint import atomic_dir

from test_trainer import _trainer  # same directory (pytest rootdir import)


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: proof of code execution if it runs."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crash_at(trainer, step: int) -> None:
    orig = trainer.module.forward

    def crash(batch, s):
        if s == step:
            raise KeyboardInterrupt
        return orig(batch, s)
    trainer.module.forward = crash


def _params(t) -> list[torch.Tensor]:
    return [p.detach().clone() for p in t.module.parameters()]


def test_crafted_optimizer_pickle_is_refused_not_executed(tmp_path):
    t = _trainer(tmp_path, 3)
    t.train()
    marker = tmp_path / "pwned"
    (tmp_path / "checkpoints" / "step-3" / "optimizer.pt").write_bytes(
        pickle.dumps({"optimizer": _Payload(str(marker))}))
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt") as ei:
        _trainer(tmp_path, 6).train()
    assert not marker.exists(), "the crafted pickle ran"
    assert "run.resume=false" in str(ei.value)
    # and through read_checkpoint directly
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt"):
        ckpt.read_checkpoint(tmp_path / "checkpoints" / "step-3")
    assert not marker.exists()


@pytest.mark.parametrize("victim", ["trainable.safetensors", "optimizer.pt", "state.json"])
def test_corrupt_newest_checkpoint_falls_back_to_an_older_one(tmp_path, victim, caplog):
    full = _trainer(tmp_path / "full", 9)
    full.train()
    part = _trainer(tmp_path / "part", 9)  # checkpoints at 3 and 6, crashes at step 7
    _crash_at(part, 7)
    with pytest.raises(KeyboardInterrupt):
        part.train()
    bad = tmp_path / "part" / "checkpoints" / "step-6" / victim
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated (a disk full, a killed copy)
    resumed = _trainer(tmp_path / "part", 9)
    with caplog.at_level("WARNING"):
        resumed.train()
    assert any(str(bad) in r.getMessage() and "skipping" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert resumed.step == 9
    # resumed from step 3: still the uninterrupted run's result, exactly
    for p, q in zip(_params(full), _params(resumed)):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_all_checkpoints_unusable_is_a_clear_error_not_a_silent_restart(tmp_path):
    t = _trainer(tmp_path, 3)
    t.train()
    (tmp_path / "checkpoints" / "step-3" / "trainable.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint") as ei:
        _trainer(tmp_path, 6).train()
    assert "trainable.safetensors" in str(ei.value)


def test_checkpoint_for_another_model_is_refused(tmp_path):
    t = _trainer(tmp_path, 3)
    t.train()
    other = _trainer(tmp_path / "o", 3)
    other.module.lin = torch.nn.Linear(5, 1)  # a different shape under the same name
    other.params = list(other.module.parameters())
    other.param_names = [n for n, _ in other.module.named_parameters()]
    with pytest.raises(ckpt.CheckpointError, match="shape"):
        other.load_checkpoint(tmp_path / "checkpoints" / "step-3")


def test_non_finite_gradient_never_steps_and_names_a_good_checkpoint(tmp_path):
    """A finite loss with a NaN gradient (what lr=1e6 produced) stops before the optimizer
    steps: the weights stay finite and the named checkpoint loads."""
    t = _trainer(tmp_path, 10)
    orig = t.module.forward

    def nan_grad_at_5(batch, step):
        out = orig(batch, step)
        if step == 5:
            t.module.lin.weight.register_hook(lambda g: g * float("nan"))
        return out
    t.module.forward = nan_grad_at_5
    with pytest.raises(TrainingDiverged, match="gradient norm nan") as ei:
        t.train()
    assert "did not step" in str(ei.value) and "step-3" in str(ei.value)
    assert all(bool(torch.isfinite(p).all()) for p in t.module.parameters())
    good = ckpt.read_checkpoint(tmp_path / "checkpoints" / "step-3")
    assert good.step == 3


def test_diverged_weights_are_never_saved(tmp_path):
    """Weights that overflow in an update (finite loss and gradient at the step itself, as in
    half precision): the save is refused, the error names the last good checkpoint, and no
    checkpoint on disk holds a non-finite value."""
    t = _trainer(tmp_path, 4, save_every=1)

    def overflow(opt, args, kwargs):
        if t.step == 1:  # the second update (t.step counts finished steps)
            t.module.lin.weight.data.fill_(float("inf"))
    t.optimizer.register_step_post_hook(overflow)
    with pytest.raises(TrainingDiverged, match="not finite") as ei:
        t.train()
    assert "step-1" in str(ei.value)
    found = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert [d.name for d in found] == ["step-1"]
    for d in found:
        c = ckpt.read_checkpoint(d)  # raises if any tensor is not finite
        assert all(bool(torch.isfinite(v).all()) for v in c.params.values())


def test_rng_state_round_trips_without_pickled_objects(tmp_path):
    import random

    import numpy as np
    state = ckpt.capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)  # restricted loader
    a = (torch.rand(3), random.random(), np.random.rand())
    ckpt.restore_rng(loaded)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert math.isfinite(b[1])


def test_atomic_dir_fsyncs_files_and_folders_and_uses_normal_permissions(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)
    monkeypatch.setattr(os, "fsync", spy)
    with atomic_dir(tmp_path / "ck") as tmp:
        (tmp / "a.bin").write_bytes(b"x")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"y")
    names = [os.path.basename(p) for p in synced]
    assert "a.bin" in names and "b.bin" in names  # the data ...
    assert any(n.startswith(".ck.") for n in names)  # ... the folder before the rename ...
    assert str(tmp_path) in synced  # ... and the parent after it
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "ck").stat().st_mode) == 0o777 & ~umask
