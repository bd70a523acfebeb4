"""GradCache (fam.train.gradcache) gives the full-batch gradient (STYLE practice 5).

Tiny xs Qwen2-VL with LoRA, float64 weights. Batches mix image and text-only rows (so
chunks split Qwen2-VL's flat pixel_values by image) and rows with and without hard
negatives. "Full batch" is one forward of the whole batch when no randomness is involved;
with dropout and VEIN masks (drawn from the global RNG) the reference keeps the graph of
every chunk (same random draws as GradCache's first pass) and back-propagates once.
"""
from __future__ import annotations

import pytest
import torch

from fam.backbones import build_tiny
from fam.config import LoraConfig, OptimConfig, RunConfig
from fam.data.mmeb import TrainPair
from fam.data.types import MMItem
from fam.losses.vein import VeinHead
from fam.model import EmbeddingModel, apply_lora
from fam.train import gradcache as gc
from fam.train.adapt import ContrastiveLoss, ContrastiveModule, PairCollator
from fam.train.align import AlignCollator, MACLoss, MACModule
from fam.data.captions import CaptionSample
from fam.train.trainer import Trainer

CORPUS = ["a red circle left of a blue square", "a small green triangle above a yellow star",
          "Represent the given image.", "what colour is the circle?"]
WORDS = ["red", "blue", "green", "yellow", "circle", "square", "star", "small", "left", "above"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_pairs(images, n: int = 8, neg_every: int = 2) -> list[TrainPair]:
    """Pairs mixing image queries, text-only queries, and rows with/without negatives."""
    pairs = []
    for i in range(n):
        img = images[i % len(images)]
        text = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3 + i % 3))
        q = MMItem("<|image_1|>\nRepresent the given image.", img) if i % 4 != 3 else \
            MMItem(f"Find: {text}")
        pos = MMItem(f"a photo of {text}") if i % 3 else MMItem("<|image_1|> the image", img)
        neg = MMItem(f"not {text} {i}") if i % neg_every == 0 else None
        pairs.append(TrainPair(q, pos, neg, "toy", "toy.jsonl", i + 1))
    return pairs


def make_module(kind: str, lora_dropout: float = 0.0, vein: bool = False, vein_dropout: float = 0.0,
                dtype=torch.float64, seed: int = 0):
    adapter = build_tiny("qwen2_vl", size="xs", corpus=CORPUS, vocab_size=400, seed=seed,
                         image_size=84)
    emb = EmbeddingModel(adapter)
    for p in adapter.model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    apply_lora(emb, LoraConfig(enabled=True, r=4, alpha=8, dropout=lora_dropout))
    if kind == "mac":
        module, loss = MACModule(emb, token_layer=-1), MACLoss()
    else:
        head = None
        if vein:
            head = VeinHead(adapter.hidden_size, [emb.resolve_layer(-1), emb.resolve_layer(-2)],
                            num_layers=emb.num_layers + 1, gamma=0.3, dropout=vein_dropout)
        module, loss = ContrastiveModule(emb, head), ContrastiveLoss(0.05, vein_weight=0.7)
    return module.to(dtype).train(), loss


def _full(module, loss, batch):
    """The plain (one-forward) loss terms of the whole batch."""
    return loss(**module(batch, 0), batch=batch, step=0)


def _grads(module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in module.named_parameters()
           if p.requires_grad and p.grad is not None}
    module.zero_grad(set_to_none=True)
    return out


# GradCache parity runs in float64 (eps 2^-53 ≈ 1.1e-16): chunking only changes summation
# order, measured ≤ 2e-12 relative on these gradients; 1e-9 (as the DDP tests) leaves
# ~500× headroom, atol 1e-12 covers entries that are zero up to rounding.
PARITY_RTOL, PARITY_ATOL = 1e-9, 1e-12


def _assert_same(a: dict, b: dict, rtol=PARITY_RTOL, atol=PARITY_ATOL):  # reason above
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)  # PARITY_RTOL


def _chunkwise_reference(module, loss_fn, batch, chunk: int):
    """Full graph over all chunks (same RNG draws as GradCache's pass 1), one backward."""
    outs = [module(c, 0) for c in batch.split(chunk)]
    loss = loss_fn(**gc.combine(outs), batch=batch, step=0)["loss"]
    loss.backward()
    return loss.detach()


def _pair_batch(module, scene_images, n=8, dtype=torch.float64):
    adapter = module.embedder.adapter
    batch = PairCollator(adapter, hard_negatives=True)(make_pairs(scene_images, n))
    cast = lambda e: e.to("cpu", dtype) if e is not None else None  # noqa: E731
    batch.query, batch.target, batch.neg = cast(batch.query), cast(batch.target), cast(batch.neg)
    batch.vein_query = batch.query.has_image.clone()
    batch.vein_target = batch.target.has_image.clone()
    return batch


def test_split_encoded_splits_flat_qwen_pixels_by_image(scene_images):
    module, _ = make_module("task", dtype=torch.float32)
    batch = _pair_batch(module, scene_images, 8, torch.float32)
    q = batch.query
    parts = [gc.split_encoded(q, s, e) for s, e in gc.chunk_bounds(q.batch_size, 3)]
    assert [p.batch_size for p in parts] == [3, 3, 2]
    assert torch.equal(torch.cat([p.inputs["pixel_values"] for p in parts if "pixel_values" in p.inputs]),
                       q.inputs["pixel_values"])
    n_img = [int(p.has_image.sum()) for p in parts]
    assert [p.inputs["image_grid_thw"].shape[0] if n else 0 for p, n in zip(parts, n_img)] == n_img
    # Row 3 is text-only: a chunk made of it alone carries no pixel inputs at all.
    assert "pixel_values" not in gc.split_encoded(q, 3, 4).inputs


def test_task_loss_with_hard_negatives_matches_full_batch(scene_images):
    module, loss = make_module("task")
    batch = _pair_batch(module, scene_images, 8)
    assert batch.neg is not None and 0 < batch.neg_rows.numel() < 8
    full = _full(module, loss, batch)
    full["loss"].backward()
    want = _grads(module)
    terms = gc.gradcache_step(module, loss, batch, 0, 3)  # uneven chunks: 3, 3, 2
    got = _grads(module)
    torch.testing.assert_close(terms["loss"], full["loss"].detach(), rtol=PARITY_RTOL, atol=0)  # float64 loss
    _assert_same(got, want)


def test_mac_matches_full_batch(scene_images):
    module, loss = make_module("mac")
    adapter = module.embedder.adapter
    samples = [CaptionSample(scene_images[i % 3], "", " ".join(WORDS[i:i + 3 + i % 2]),
                             "caps.json", i + 1, "caption") for i in range(6)]
    batch = AlignCollator(adapter, "Represent the given image.", "Find: ")(samples)
    batch.images = batch.images.to("cpu", torch.float64)
    batch.texts = batch.texts.to("cpu", torch.float64)
    full = _full(module, loss, batch)
    full["loss"].backward()
    want = _grads(module)
    terms = gc.gradcache_step(module, loss, batch, 0, 4)
    _assert_same(_grads(module), want)
    for k in ("loss", "coarse_loss", "c2f_loss", "fine_loss"):
        torch.testing.assert_close(terms[k], full[k].detach(), rtol=PARITY_RTOL, atol=0)  # float64 loss


def test_vein_and_dropout_replay_the_rng(scene_images, monkeypatch):
    """Dropout in LoRA and the VEIN decoder, random VEIN masks: exact only with RNG replay."""
    module, loss = make_module("task", lora_dropout=0.2, vein=True, vein_dropout=0.2)
    batch = _pair_batch(module, scene_images, 8)
    torch.manual_seed(123)
    ref_loss = _chunkwise_reference(module, loss, batch, 3)
    want = _grads(module)
    after_ref = torch.rand(3)
    torch.manual_seed(123)
    terms = gc.gradcache_step(module, loss, batch, 0, 3)
    # The RNG continues where pass 1 left it: later draws do not depend on GradCache.
    torch.testing.assert_close(torch.rand(3), after_ref)
    torch.testing.assert_close(terms["loss"], ref_loss, rtol=PARITY_RTOL, atol=0)  # float64 loss
    assert "rec_loss" in terms and terms["rec_loss"] > 0
    _assert_same(_grads(module), want)
    # Without the replay the re-run draws other dropout/mask values: the test would see it.
    monkeypatch.setattr(gc.RngState, "restore", lambda self: None)
    torch.manual_seed(123)
    gc.gradcache_step(module, loss, batch, 0, 3)
    bad = _grads(module)
    # the parity tolerance, which the un-replayed run must miss
    assert any(not torch.allclose(bad[k], want[k], rtol=PARITY_RTOL, atol=PARITY_ATOL)
               for k in want)


def test_vein_chunk_scaling_matches_one_forward_full_batch(scene_images, monkeypatch):
    """With row-independent (deterministic) masks, GradCache's per-chunk VEIN sums scaled
    by λ/N equal the one-forward full-batch loss and gradient."""
    import fam.losses.vein as vein_mod

    def fixed(valid, gamma, generator=None):  # same rule, noise that depends on position only
        b, n = valid.shape
        n_valid = valid.sum(1)
        k = torch.minimum((n_valid.double() * gamma + 1e-9).floor().long().clamp(min=1), n_valid - 1)
        noise = ((torch.arange(n) * 7 % n).double() / n)[None].expand(b, n)
        order = noise.masked_fill(~valid, 2.0).argsort(dim=1, stable=True)
        idx = order[:, :int(k.max())]
        slot = torch.arange(idx.shape[1])[None] < k[:, None]
        masked = torch.zeros(b, n, dtype=torch.bool).scatter_(1, idx, slot)
        return masked, idx, k
    monkeypatch.setattr(vein_mod, "vein_mask_positions", fixed)
    module, loss = make_module("task", vein=True)
    batch = _pair_batch(module, scene_images, 8)
    full = _full(module, loss, batch)
    full["loss"].backward()
    want = _grads(module)
    terms = gc.gradcache_step(module, loss, batch, 0, 3)
    torch.testing.assert_close(terms["loss"], full["loss"].detach(), rtol=PARITY_RTOL, atol=0)  # float64 loss
    torch.testing.assert_close(terms["rec_loss"], full["rec_loss"], rtol=PARITY_RTOL, atol=0)  # float64 loss
    _assert_same(_grads(module), want)


def _trainer(module, loss, pairs, out, chunk: int, steps: int = 3):
    adapter = module.embedder.adapter
    opt = OptimConfig(lr=5e-3, batch_size=8, steps=steps, warmup_ratio=0.0, grad_clip=1.0)
    run = RunConfig(out_dir=str(out), save_every=0, progress=False, log_every=1, device="cpu")
    return Trainer(module, pairs, PairCollator(adapter, True), opt, run, "gc-test", loss=loss,
                   gradcache_chunk=chunk)


def test_trainer_run_with_gradcache_equals_without(scene_images, tmp_path):
    pairs = make_pairs(scene_images, 16)
    runs = {}
    for chunk in (0, 3):
        module, loss = make_module("task", dtype=torch.float32)
        _trainer(module, loss, pairs, tmp_path / f"c{chunk}", chunk).train()
        runs[chunk] = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    base, _ = make_module("task", dtype=torch.float32)
    changed = [n for n, p in base.named_parameters() if p.requires_grad
               and not torch.allclose(p, runs[0][n])]
    assert changed  # training moved the LoRA weights
    _assert_same(runs[3], runs[0], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_leaves_gradients_unchanged(scene_images):
    from fam.train.embedder import enable_gradient_checkpointing
    module, loss = make_module("task", lora_dropout=0.2)
    batch = _pair_batch(module, scene_images, 6)
    torch.manual_seed(5)
    _full(module, loss, batch)["loss"].backward()
    want = _grads(module)
    enable_gradient_checkpointing(module.embedder)
    torch.manual_seed(5)
    _full(module, loss, batch)["loss"].backward()
    _assert_same(_grads(module), want)


def _vm_kb(field: str) -> int:
    from pathlib import Path
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").environ.get("FAM_REAL_SIZE"),
                    reason="real-size smoke test: set FAM_REAL_SIZE=1 (needs ~6 GB RAM, minutes)")
def test_real_size_qwen2_vl_2b_shape_gradcache_step_fits_10gb(scene_images):
    """A random Qwen2-VL-2B-shaped model (published shapes, fam.backbones.qwen2_vl
    PUBLISHED_SIZES), bf16, LoRA r=8: one GradCache training step (batch 2, chunk 1,
    112 px = 16 image tokens) on CPU.

    CPUs without native bf16 matmul (AVX2 only) run bf16 GEMMs through a slow dot-product
    fallback: a batch of 4 at 224 px took over 20 minutes on the 2-core test machine."""
    import logging
    import time

    from fam.bench.plan import KNOWN_SHAPES, PlanConfig, estimate

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    # Created in bf16: the 8 GB fp32 copy is never materialised.
    adapter = build_tiny("qwen2_vl", size="2b", corpus=CORPUS, vocab_size=400, seed=0,
                         image_size=112, dtype=torch.bfloat16)
    model = adapter.model
    emb = EmbeddingModel(adapter)
    for p in model.parameters():
        p.requires_grad_(False)
    apply_lora(emb, LoraConfig(enabled=True, r=8, alpha=16, dropout=0.05))
    module, loss = ContrastiveModule(emb).train(), ContrastiveLoss(0.02)
    n_params = sum(p.numel() for p in module.parameters())
    build_s = time.perf_counter() - t0
    batch = PairCollator(adapter, True)(make_pairs(scene_images, 2))
    batch.query, batch.target = batch.query.to("cpu", torch.bfloat16), batch.target.to("cpu", torch.bfloat16)
    batch.neg = batch.neg.to("cpu", torch.bfloat16) if batch.neg is not None else None
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    t1 = time.perf_counter()
    terms = gc.gradcache_step(module, loss, batch, 0, 1)
    opt.step()
    step_s = time.perf_counter() - t1
    peak_gb = _vm_kb("VmHWM") * 1024 / 1e9
    plan = estimate(KNOWN_SHAPES["Qwen2-VL-2B"], PlanConfig(
        batch=2, chunk=1, image_size=112, text_tokens=12, sequences=3, lora_rank=8))
    msg = (f"real-size smoke: {n_params / 1e9:.2f} B params (bf16), build {build_s:.0f} s, "
           f"GradCache step (B=2, chunk 1, 112 px) {step_s:.1f} s, loss {float(terms['loss']):.3f}, "
           f"peak RSS {peak_gb:.2f} GB (planner total, full vocab: {plan['total'] / 1e9:.2f} GB)")
    logging.getLogger(__name__).warning(msg)
    print(msg)
    assert torch.isfinite(terms["loss"])
    assert all(p.grad is not None for p in params)
    assert peak_gb < 10.0


def test_split_encoded_drops_padding_columns_of_the_chunk(scene_images):
    module, _ = make_module("task", dtype=torch.float32)
    batch = _pair_batch(module, scene_images, 8, torch.float32)
    q = batch.query
    L = q.image_mask.shape[1]
    short = [i for i in range(q.batch_size) if int(q.inputs["attention_mask"][i].sum()) < L]
    assert short  # some row is padded
    i = short[0]
    part = gc.split_encoded(q, i, i + 1)
    n = int(q.inputs["attention_mask"][i].sum())
    assert part.inputs["input_ids"].shape[1] == part.image_mask.shape[1] == n
    assert torch.equal(part.inputs["input_ids"][0], q.inputs["input_ids"][i, :n])
    assert int(part.eos_index[0]) == n - 1
    # The chunk's embedding equals the row's in the full padded batch (float64).
    module64, _ = make_module("task")
    b64 = _pair_batch(module64, scene_images, 8)
    with torch.no_grad():
        full = module64.embedder(b64.query).embedding[i]
        alone = module64.embedder(gc.split_encoded(b64.query, i, i + 1)).embedding[0]
    # float64: shorter padded length changes only the summation order (~1e-16 per op).
    torch.testing.assert_close(alone, full, rtol=0, atol=1e-12)


def test_forward_parts_are_the_forward_in_parts(scene_images):
    module, _ = make_module("task")
    batch = _pair_batch(module, scene_images, 6)
    with torch.no_grad():
        whole = module(batch, 0)
        parts = list(module.forward_parts(batch, 0))
    assert [sorted(p) for p in parts] == [["q"], ["t"], ["n"]]
    for p in parts:
        for k, v in p.items():
            torch.testing.assert_close(v, whole[k], rtol=0, atol=0)
    vein_module, _ = make_module("task", vein=True)
    assert len(list(vein_module.forward_parts(_pair_batch(vein_module, scene_images, 4), 0))) == 1


def test_gradcache_runs_a_frozen_vision_tower_once_per_chunk(scene_images):
    module, loss = make_module("task")
    batch = _pair_batch(module, scene_images, 8)
    full = _full(module, loss, batch)
    full["loss"].backward()
    want = _grads(module)
    ran = []
    visual = module.embedder.adapter.hf_model.model.visual
    visual.patch_embed.register_forward_hook(lambda m, a, o: ran.append(1))
    with torch.no_grad():
        for c in batch.split(3):
            module(c, 0)
    once = len(ran)
    assert once > 0
    gc.gradcache_step(module, loss, batch, 0, 3)
    # Pass 3 replays pass 1's features of the frozen tower (LoRA on the language model).
    assert len(ran) == 2 * once
    _assert_same(_grads(module), want)


def test_gradcache_keeps_the_last_chunks_graph_instead_of_a_re_run(scene_images):
    module, loss = make_module("task")
    batch = _pair_batch(module, scene_images, 8)
    full = _full(module, loss, batch)
    full["loss"].backward()
    want = _grads(module)
    calls = []
    module.embedder.register_forward_hook(lambda m, a, o: calls.append(torch.is_grad_enabled()))
    gc.gradcache_step(module, loss, batch, 0, 3)  # chunks 3, 3, 2; 3 sides each
    # Pass 1: chunks 0-1 without grad, chunk 2 with (kept); pass 3 re-runs chunks 0-1 only.
    assert calls == [False] * 6 + [True] * 3 + [True] * 6
    _assert_same(_grads(module), want)
