"""The shared-prefix forward (fam.backbones.prefix) and the frozen vision tower's memo
(fam.backbones.fastpath.OutputMemo) give the plain forward's results."""
from __future__ import annotations

import pytest
import torch

from fam.backbones import build_tiny
from fam.backbones import prefix as px
from fam.backbones.fastpath import OutputMemo, frozen_vision_memo
from fam.config import LoraConfig
from fam.data.types import MMItem
from fam.model import EmbeddingModel, apply_lora

CORPUS = ["find me an everyday image that matches the given caption",
          "a red circle left of a blue square", "a small green triangle above a yellow star"]
PROMPT = "find me an everyday image that matches the given caption: "
CAPTIONS = ["a red circle", "a small green triangle above a yellow star and a blue square",
            "a blue square left of a red circle", "a star"]


def _model(family: str = "qwen2_vl", **kw) -> EmbeddingModel:
    adapter = build_tiny(family, size="xs", corpus=CORPUS, vocab_size=300, seed=0,
                         image_size=56, **kw)
    return EmbeddingModel(adapter).double().eval()  # the prefix is an encoding path


def _plain(model, batch):
    """The same forward without the shared prefix (pooled_only off: every row computed)."""
    return model(batch).embedding


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_shared_prefix_equals_the_plain_forward(family, monkeypatch):
    model = _model(family)
    batch = model.adapter.encode([MMItem(PROMPT + c) for c in CAPTIONS])
    n = px.shared_prefix_len(model.adapter, batch)
    assert n >= px.MIN_PREFIX  # the prompt's tokens
    calls = []
    real = px.shared_prefix_forward
    monkeypatch.setattr("fam.model.embedding.shared_prefix_forward",
                        lambda *a: calls.append(a[2]) or real(*a))
    with torch.no_grad():
        fast = model(batch, pooled_only=True).embedding
        plain = _plain(model, batch)
    assert calls == [n]
    # float64: each row's tokens see the same operations (prefix keys/values computed on
    # one row instead of four), rounding ~1e-16.
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-12)


def test_shared_prefix_gradients_equal_the_plain_forward():
    """An eval-mode forward with grad (e.g. attributions) may take the prefix path: its
    gradients reach the prefix's parameters summed over the rows."""
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    model.double().eval()
    batch = model.adapter.encode([MMItem(PROMPT + c) for c in CAPTIONS])
    assert px.shared_prefix_len(model.adapter, batch) > 0
    params = [p for p in model.parameters() if p.requires_grad]
    w = torch.randn(len(CAPTIONS), model.adapter.hidden_size, dtype=torch.float64)
    fast = model(batch, pooled_only=True).embedding
    g_fast = torch.autograd.grad((fast * w).sum(), params)
    plain = _plain(model, batch)
    g_plain = torch.autograd.grad((plain * w).sum(), params)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-12)  # float64, as above
    for a, b in zip(g_fast, g_plain):
        # These float64 gradients are ill-conditioned (random tiny model, normalised
        # embeddings): the plain forward itself, row by row vs batched, differs by up to
        # 1e-8 relative (measured); a prefix whose gradient were lost (detached) or not
        # summed over the rows would be off by O(1).
        # Hence a norm-wise check: |a - b| <= 1e-6 |b| (measured ~1e-8).
        assert float((a - b).norm()) <= 1e-6 * float(b.norm()) + 1e-12


def test_shared_prefix_applies_only_where_exact(scene_images):
    model = _model()
    adapter = model.adapter
    enc = lambda items: adapter.encode(items)  # noqa: E731
    text = [MMItem(PROMPT + c) for c in CAPTIONS]
    assert px.shared_prefix_len(adapter, enc(text)) > 0
    # An image in the batch, rows without a common start, a single row: plain forward.
    assert px.shared_prefix_len(adapter, enc(text[:3] + [MMItem("<|image_1|> x",
                                                                scene_images[0])])) == 0
    assert px.shared_prefix_len(adapter, enc([MMItem(c) for c in CAPTIONS])) == 0
    assert px.shared_prefix_len(adapter, enc(text[:1])) == 0
    # Left padding moves the prefix; dropout in training would draw one mask for all rows.
    adapter.padding_side = "left"
    assert px.shared_prefix_len(adapter, enc(text)) == 0
    adapter.padding_side = "right"
    for p in model.parameters():
        p.requires_grad_(False)
    apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.1))
    model.train()
    assert px.shared_prefix_len(adapter, enc(text)) == 0
    model.eval()
    assert px.shared_prefix_len(adapter, enc(text)) > 0


def test_training_never_takes_the_prefix_path(monkeypatch):
    """In training a batch's path must not depend on how it is split (DDP ranks, GradCache
    chunks share different prefixes): the split forward equals the plain one only to float32
    rounding, which broke the float64 DDP parity tests (1e-8 relative vs their 1e-9)."""
    model = _model().train()
    batch = model.adapter.encode([MMItem(PROMPT + c) for c in CAPTIONS])
    assert px.shared_prefix_len(model.adapter, batch) > 0  # the batch itself qualifies
    calls = []
    monkeypatch.setattr("fam.model.embedding.shared_prefix_forward",
                        lambda *a: calls.append(a[2]))
    with torch.no_grad():  # GradCache's first pass: no grad, training mode
        model(batch, pooled_only=True)
    model(batch, pooled_only=True)
    assert calls == []


def test_output_memo_replays_the_recorded_outputs():
    mod = torch.nn.Sequential(torch.nn.Linear(3, 2)).double()
    memo = OutputMemo(mod)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    with memo.record("a"):
        want = mod(x)
    computed = []
    mod[0].register_forward_hook(lambda m, a, o: computed.append(1))
    with memo.replay("a"):
        got = mod(x)
        other = mod(y)  # nothing recorded for it: computed
    assert torch.equal(got, want) and len(computed) == 1
    # float64, the same product computed the same way.
    torch.testing.assert_close(other, y @ mod[0].weight.T + mod[0].bias, rtol=0, atol=1e-12)
    assert "forward" not in mod.__dict__  # the module's own forward again
    with memo.replay("a"):  # a record is replayed once
        mod(x)
    assert len(computed) == 2
    with memo.record("b"):
        mod(x)
    x.add_(1.0)  # changed in place since recorded: computed
    with memo.replay("b"):
        mod(x)
    assert len(computed) == 4


def test_frozen_vision_memo_only_for_a_frozen_tower():
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    assert frozen_vision_memo(model.adapter) is not None  # LoRA: language model only
    next(model.adapter.hf_model.model.visual.parameters()).requires_grad_(True)
    assert frozen_vision_memo(model.adapter) is None
