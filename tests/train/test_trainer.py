"""The training loop: exact resume, atomic checkpoints, NaN detection, schedules."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fam.config import OptimConfig, RunConfig
from fam.train.schedule import ResumableBatchSampler, lr_lambda
from fam.train.trainer import Trainer, TrainingDiverged


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 1)
        self.drop = nn.Dropout(0.5)  # exercises the RNG state on resume

    def forward(self, batch, step):
        x, y = batch
        return {"loss": ((self.lin(self.drop(x)).squeeze(-1) - y) ** 2).mean()}


def _data(n=64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    return [(x[i], y[i]) for i in range(n)]


def _collate(ex):
    return torch.stack([e[0] for e in ex]), torch.stack([e[1] for e in ex])


def _trainer(out, steps, save_every=3, **kw):
    opt = OptimConfig(lr=0.05, steps=steps, batch_size=8, warmup_ratio=0.2, **kw)
    run = RunConfig(out_dir=str(out), save_every=save_every, progress=False, log_every=2)
    return Trainer(Toy(), _data(), _collate, opt, run, "toy",
                   to_device=lambda b, d: (b[0].to(d), b[1].to(d)))


def test_resume_is_exact(tmp_path):
    full = _trainer(tmp_path / "a", 12)
    full.train()
    # interrupted run: same config, but "crashes" after 7 steps (checkpoint at 6)
    part = _trainer(tmp_path / "b", 12)
    part.optim_cfg = OptimConfig(**{**part.optim_cfg.__dict__})
    orig = part.module.forward

    def crash(batch, step):
        if step == 7:
            raise KeyboardInterrupt
        return orig(batch, step)
    part.module.forward = crash
    with pytest.raises(KeyboardInterrupt):
        part.train()
    resumed = _trainer(tmp_path / "b", 12)
    resumed.train()
    assert resumed.step == 12
    for p, q in zip(full.module.parameters(), resumed.module.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_incomplete_checkpoint_is_ignored(tmp_path):
    t = _trainer(tmp_path, 6)
    t.train()
    (tmp_path / "checkpoints" / "step-99").mkdir()  # no state.json: a crash mid-write
    assert [d.name for d in t._ckpt_dirs()][-1] == "step-6"
    assert len(t._ckpt_dirs()) <= 2  # keep_checkpoints


def test_nan_loss_stops_with_a_clear_error_and_keeps_checkpoints(tmp_path):
    t = _trainer(tmp_path, 10)
    orig = t.module.forward

    def nan_at_5(batch, step):
        out = orig(batch, step)
        if step == 5:
            out["loss"] = out["loss"] * float("nan")
        return out
    t.module.forward = nan_at_5
    with pytest.raises(TrainingDiverged, match="step 5") as ei:
        t.train()
    assert "step-3" in str(ei.value)
    assert (tmp_path / "checkpoints" / "step-3" / "state.json").exists()


def test_grad_accumulation_matches_full_batch(tmp_path):
    a = _trainer(tmp_path / "a", 4)
    b = _trainer(tmp_path / "b", 4, grad_accum=2)
    a.module.drop.p = b.module.drop.p = 0.0
    a.train()
    b.train()
    for p, q in zip(a.module.parameters(), b.module.parameters()):
        # float32: two half-batch gradients summed vs one full-batch gradient differ by rounding
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_sampler_order_is_resumable_and_sharded():
    full = list(ResumableBatchSampler(20, 4, 12, seed=3))
    tail = list(ResumableBatchSampler(20, 4, 12, seed=3, start_step=5))
    assert full[5:] == tail
    # each epoch is a permutation (5 batches of 4 = all 20)
    assert sorted(sum(full[:5], [])) == list(range(20))
    r0 = list(ResumableBatchSampler(20, 2, 6, seed=3, rank=0, world_size=2))
    r1 = list(ResumableBatchSampler(20, 2, 6, seed=3, rank=1, world_size=2))
    assert all(sorted(a + b) == sorted(f) for a, b, f in zip(r0, r1, full))


def test_lr_schedule_warmup_and_decay():
    f = lr_lambda(OptimConfig(steps=100, warmup_ratio=0.1, schedule="cosine"))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    # cos(π) + 1 in float64 is ~1e-16, not 0
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.0, abs=1e-9)
    # cosine schedule at the midpoint of 90 decay steps: float64 rounding
    assert f(55) == pytest.approx(0.5, abs=1e-6)
    g = lr_lambda(OptimConfig(steps=10, warmup_ratio=0.0, schedule="linear"))
    assert g(5) == pytest.approx(0.5)


def test_extending_a_finished_run_follows_the_new_schedule(tmp_path):
    # 4 steps, then the same run extended to 8: steps 5..8 use the 8-step schedule's lr,
    # exactly as an uninterrupted 8-step run would from the same point.
    short = _trainer(tmp_path / "a", 4, save_every=0)
    short.module.drop.p = 0.0
    short.train()
    longer = _trainer(tmp_path / "a", 8, save_every=0)
    longer.module.drop.p = 0.0
    longer.train()
    assert longer.step == 8
    # lr × (cos(π)+1)/2 in float64 is ~1e-17, not 0
    assert longer.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    resumed = _trainer(tmp_path / "b", 8, save_every=0)
    resumed.module.drop.p = 0.0
    resumed.load_checkpoint(tmp_path / "a" / "checkpoints" / "step-4")
    f = lr_lambda(resumed.optim_cfg)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * f(4))


def test_train_metrics_hold_the_curve(tmp_path):
    """``train_metrics.json``'s history: one point per CURVE_EVERY steps plus the last step,
    each the mean of its steps' terms, with the gradient norm and the learning rate."""
    import json

    from fam.train.trainer import CURVE_EVERY
    t = _trainer(tmp_path / "c", CURVE_EVERY * 2 + 3)
    t.train()
    m = json.loads((tmp_path / "c" / "train_metrics.json").read_text())
    h = m["history"]
    assert [p["step"] for p in h] == [CURVE_EVERY, 2 * CURVE_EVERY, 2 * CURVE_EVERY + 3]
    assert m["curve_every"] == CURVE_EVERY
    for p in h:
        assert set(p) >= {"loss", "grad_norm", "lr"} and p["loss"] > 0 and p["grad_norm"] > 0
    assert h[-1]["lr"] == m["final"]["lr"]  # the last point is at the last step
    assert h[0]["loss"] > h[-1]["loss"]  # the toy regression learns
