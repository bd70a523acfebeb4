"""VEIN (method.md §3): masking, eligibility, gradient routing, zero-sample safety, learnability."""
from __future__ import annotations

import math

import pytest
import torch

from fam.losses.vein import VeinDecoder, VeinHead, vein_eligible, vein_mask_positions

D = 16


def _batch(b=4, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, n, D, generator=g)
    emb = torch.randn(b, D, generator=g)
    lengths = torch.tensor([n, 7, 2, 5])[:b]
    image_mask = torch.arange(n)[None] < lengths[:, None]
    return tokens, emb, image_mask


@pytest.mark.parametrize("gamma", [0.3, 0.5, 0.9])
def test_mask_ratio_exact_and_only_valid_positions(gamma):
    _, _, valid = _batch()
    masked, idx, k = vein_mask_positions(valid, gamma, torch.Generator().manual_seed(1))
    n_valid = valid.sum(1)
    want = [min(max(1, math.floor(gamma * int(nv) + 1e-9)), int(nv) - 1) for nv in n_valid]
    assert masked.sum(1).tolist() == want == k.tolist()
    assert not (masked & ~valid).any(), "padding must never be masked"
    for row in range(len(k)):
        assert set(idx[row, :k[row]].tolist()) == set(masked[row].nonzero().flatten().tolist())


def test_mask_positions_reproducible_and_random():
    valid = torch.ones(3, 50, dtype=torch.bool)
    a = vein_mask_positions(valid, 0.3, torch.Generator().manual_seed(7))[0]
    b = vein_mask_positions(valid, 0.3, torch.Generator().manual_seed(7))[0]
    c = vein_mask_positions(valid, 0.3, torch.Generator().manual_seed(8))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1]), "positions are drawn per sample"


def test_too_few_tokens_and_bad_gamma_raise():
    with pytest.raises(ValueError, match="fewer than 2 image tokens"):
        vein_mask_positions(torch.tensor([[True, False, False]]), 0.3)
    with pytest.raises(ValueError, match="gamma"):
        VeinDecoder(D, gamma=1.0)


def test_eligibility_rule_and_override():
    assert vein_eligible(True, "retrieval")
    assert vein_eligible(True, "Visual Grounding")
    assert not vein_eligible(True, "VQA")
    assert not vein_eligible(False, "retrieval")
    assert vein_eligible(True, "vqa", override=True)
    assert not vein_eligible(True, "retrieval", override=False)


def test_heads_fallback_for_small_widths():
    assert VeinDecoder(16).layer.self_attn.num_heads == 8
    assert VeinDecoder(12).layer.self_attn.num_heads == 6
    assert VeinDecoder(10).layer.self_attn.num_heads == 5


@pytest.mark.parametrize("detach", [True, False])
def test_gradient_routing(detach):
    torch.manual_seed(0)
    dec = VeinDecoder(D, gamma=0.3, detach_target=detach)
    tokens, emb, valid = _batch()
    tokens.requires_grad_()
    emb.requires_grad_()
    out = dec(tokens, emb, valid, generator=torch.Generator().manual_seed(3))
    g_tok, g_emb = torch.autograd.grad(out["loss"], (tokens, emb), allow_unused=True,
                                       materialize_grads=True)
    masked = out["masked"]
    tok_norm = g_tok.abs().sum(-1)  # (B, N)
    # Detached (official code): the image tokens get no gradient at all, so L_rec reaches
    # the backbone only through the embedding token. Not detached: masked positions get
    # gradient as targets, visible ones as memory.
    if detach:
        assert torch.all(tok_norm == 0)
    else:
        assert torch.all(tok_norm[masked] > 0)
        assert torch.all(tok_norm[valid & ~masked] > 0)
    assert torch.all(tok_norm[~valid] == 0)  # padding never
    assert torch.all(g_emb.abs().sum(-1) > 0)


def test_padding_content_is_ignored():
    torch.manual_seed(0)
    dec = VeinDecoder(D)
    tokens, emb, valid = _batch()
    other = torch.where(valid[..., None], tokens, torch.randn_like(tokens) * 100)
    a = dec(tokens, emb, valid, generator=torch.Generator().manual_seed(3))["loss"]
    b = dec(other, emb, valid, generator=torch.Generator().manual_seed(3))["loss"]
    torch.testing.assert_close(a, b)


def test_overfit_tiny_case():
    torch.manual_seed(0)
    dec = VeinDecoder(D, gamma=0.3)
    tokens, emb, valid = _batch()
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: thread hand-off costs more than the maths
    try:
        for _ in range(80):
            loss = dec(tokens, emb, valid, generator=torch.Generator().manual_seed(5))["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < 0.05 < 0.5 < losses[0], (losses[0], losses[-1])


def test_head_layers_subset_and_zero_samples():
    torch.manual_seed(0)
    head = VeinHead(D, layers=[-2, -1], num_layers=5)
    assert head.layers == [3, 4] and sorted(head.decoders) == ["3", "4"]
    tokens, emb, valid = _batch()
    hidden = {-2: tokens, 4: tokens * 2}  # keys may be negative or resolved
    embs = {3: emb, -1: emb + 1}
    sample_mask = torch.tensor([True, False, True, True])
    out = head(hidden, embs, valid, sample_mask, generator=torch.Generator().manual_seed(0))
    assert out["n_samples"] == 3 and set(out["per_layer"]) == {3, 4}
    torch.testing.assert_close(out["loss"], (out["per_layer"][3] + out["per_layer"][4]) / 2)
    # Same as running each decoder on the eligible rows with the same generator stream.
    g = torch.Generator().manual_seed(0)
    rows = sample_mask.nonzero().flatten()
    l3 = head.decoders["3"](tokens[rows], emb[rows], valid[rows], generator=g)["loss"]
    l4 = head.decoders["4"]((tokens * 2)[rows], (emb + 1)[rows], valid[rows], generator=g)["loss"]
    torch.testing.assert_close(out["loss"], (l3 + l4) / 2)
    # No eligible sample: a zero loss that still reaches every parameter (DDP-safe).
    out = head(hidden, embs, valid, torch.zeros(4, dtype=torch.bool))
    assert out["n_samples"] == 0 and out["loss"].item() == 0.0 and out["loss"].grad_fn is not None
    out["loss"].backward()
    assert all(p.grad is not None and torch.all(p.grad == 0) for p in head.parameters())
    with pytest.raises(ValueError, match="out of range"):
        VeinHead(D, layers=[5], num_layers=5)
    with pytest.raises(KeyError, match="no entry for layer 3"):
        head({4: tokens}, embs, valid)
