"""Late-interaction training (multivector.enabled): exact under GradCache and DDP (float64).

The tiny xs Qwen2-VL with LoRA and a 16-dim projection head; batches mix image and text rows
and rows with and without hard negatives (as tests/train/test_gradcache.py), so the token
tensors of chunks and ranks have different real lengths.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_ddp_training import _differing, _exit_cleanly, _free_port  # same directory
from test_gradcache import _assert_same, _grads, _pair_batch, make_module, make_pairs

from fam.config import AdaptConfig, OptimConfig, RunConfig, from_dict
from fam.errors import ConfigError
from fam.model.multivector import TOKEN_SETS, MultiVectorHead
from fam.losses.maxsim import SIMILARITIES
from fam.train import gradcache as gc
from fam.train.adapt import ContrastiveLoss, PairCollator
from fam.train.trainer import Trainer

WORLD, GLOBAL_BATCH, STEPS = 2, 8, 2


def make_mv_module(dtype=torch.float64, tokens="content", pooled_weight=0.5, weight=0.8,
                   similarity="meanmaxsim"):
    module, _ = make_module("task", dtype=dtype)
    torch.manual_seed(3)
    module.multivector = MultiVectorHead(module.embedder.adapter.hidden_size, 16, tokens,
                                         similarity).to(dtype).train()
    loss = ContrastiveLoss(0.05, pooled_weight=pooled_weight, mv_weight=weight,
                           mv_temperature=0.1, mv_similarity=similarity)
    return module, loss


@pytest.mark.parametrize("tokens,similarity", [("content", "meanmaxsim"), ("all", "maxsim")])
def test_gradcache_with_multivector_equals_full_batch(scene_images, tokens, similarity):
    module, loss = make_mv_module(tokens=tokens, similarity=similarity)
    batch = _pair_batch(module, scene_images, 8)
    assert batch.neg is not None and 0 < batch.neg_rows.numel() < 8
    out = module(batch, 0)
    assert out["q_tok"].shape[:2] == batch.query.inputs["input_ids"].shape
    full = loss(**out, batch=batch, step=0)
    assert {"mv_loss", "mv_accuracy", "task_loss"} <= set(full)
    full["loss"].backward()
    want = _grads(module)
    assert any(k.startswith("multivector.proj") for k in want)  # the head trains too
    assert float(want["multivector.proj.weight"].abs().max()) > 0
    terms = gc.gradcache_step(module, loss, batch, 0, 3)  # uneven chunks: 3, 3, 2
    got = _grads(module)
    # float64, only the summation order differs between chunked and full forwards
    torch.testing.assert_close(terms["loss"], full["loss"].detach(), rtol=1e-9, atol=0)
    # float64, as above
    torch.testing.assert_close(terms["mv_loss"], full["mv_loss"], rtol=1e-9, atol=0)
    # float64 gradients; chunked re-runs change the summation order only
    _assert_same(got, want, rtol=1e-7, atol=1e-12)


def test_late_loss_moves_the_total(scene_images):
    """The late term is really in the loss: its weight changes the total by weight·L_late."""
    module, loss = make_mv_module(pooled_weight=1.0, weight=0.0)
    batch = _pair_batch(module, scene_images, 6)
    with torch.no_grad():
        out = module(batch, 0)
        base = loss(**out, batch=batch)
        loss.mv_weight = 2.0
        more = loss(**out, batch=batch)
    torch.testing.assert_close(more["loss"] - base["loss"], 2.0 * base["mv_loss"])
    assert float(base["mv_loss"]) > 0


def test_config_is_validated():
    cfg = from_dict(AdaptConfig, {"multivector": {"enabled": True, "dim": 64, "tokens": "image"}})
    cfg.validate(require_inputs=False)
    for bad in ({"tokens": "patches"}, {"similarity": "cosine"}, {"dim": -1},
                {"enabled": True, "weight": 0, "pooled_weight": 0}, {"temperature": 0}):
        with pytest.raises(ConfigError, match="multivector"):
            from_dict(AdaptConfig, {"multivector": bad}).validate(require_inputs=False)


def test_config_choices_equal_the_library():
    from fam.config.stages import MULTIVECTOR_SIMILARITIES, MULTIVECTOR_TOKENS
    assert MULTIVECTOR_TOKENS == TOKEN_SETS and MULTIVECTOR_SIMILARITIES == SIMILARITIES


def _train(out, pairs, batch_size, chunk, strategy="ddp"):
    module, loss = make_mv_module()
    opt = OptimConfig(lr=5e-3, batch_size=batch_size, steps=STEPS, warmup_ratio=0.0)
    run = RunConfig(out_dir=str(out), save_every=0, progress=False, log_every=1, device="cpu",
                    strategy=strategy)
    trainer = Trainer(module, pairs, PairCollator(module.embedder.adapter, True), opt, run,
                      strategy, loss=loss, gradcache_chunk=chunk)
    trainer.train()
    full = trainer.full_state_dict()  # collective under FSDP: full tensors on every rank
    return {n: full[n].detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _worker(rank, port, out, pairs, runs):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for strategy, chunk in runs:
            name = f"mv-{strategy}-c{chunk}"
            params = _train(os.path.join(out, name), pairs, GLOBAL_BATCH // WORLD, chunk, strategy)
            if rank == 0:
                torch.save(params, os.path.join(out, f"{name}.pt"))
        dist.barrier()
        _exit_cleanly()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_multivector_training_equals_one_process(scene_images, tmp_path):
    """2 gloo ranks (DDP plain and GradCache, FSDP), token tensors padded to a common length and
    gathered with gradient: after 2 steps the LoRA and projection weights equal one process's."""
    torch.set_num_threads(1)
    pairs = make_pairs(scene_images, 16)
    runs = (("ddp", 0), ("ddp", 2), ("fsdp", 0))
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), pairs, runs), nprocs=WORLD, join=True)
    ref = _train(tmp_path / "single", pairs, GLOBAL_BATCH, 0)
    assert any(k.startswith("multivector.") for k in ref)
    for strategy, chunk in runs:
        got = torch.load(tmp_path / f"mv-{strategy}-c{chunk}.pt", weights_only=True)
        assert got.keys() == ref.keys()
        bad = _differing(got, ref)
        assert not bad, f"{strategy} chunk {chunk}: {len(bad)} of {len(ref)} tensors differ: {bad}"
