"""VEIN (method.md §3): masking, eligibility, gradient routing, zero-sample safety, learnability."""
from __future__ import annotations

import math

import pytest
import torch

from fam.losses.vein import (VeinDecoder, VeinHead, default_vein_layers, global_mean,
                             vein_eligible, vein_mask_positions, vein_verdict)
from fam.train.gradcache import grad_norms

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


# ----------------------------------------------------------------------------- variants
def _masked(valid, gamma=0.3, seed=3):
    return vein_mask_positions(valid, gamma, torch.Generator().manual_seed(seed))[0]


def test_given_mask_equals_drawn_mask():
    torch.manual_seed(0)
    dec = VeinDecoder(D)
    tokens, emb, valid = _batch()
    drawn = dec(tokens, emb, valid, generator=torch.Generator().manual_seed(3))
    given = dec(tokens, emb, valid, masked=drawn["masked"])
    torch.testing.assert_close(given["loss"], drawn["loss"])
    assert torch.equal(given["masked"], drawn["masked"])
    assert given["count"] == int(drawn["masked"].sum())
    with pytest.raises(ValueError, match="given mask"):
        dec(tokens, emb, valid, masked=valid)  # nothing left visible


def test_loss_is_the_mean_over_masked_tokens_with_target_pos():
    """L_rec = mean over all masked tokens of 1 − cos(pred, H + PE) (official: add_pos_to_gt)."""
    from fam.losses.vein import sinusoidal_positions
    torch.manual_seed(0)
    tokens, emb, valid = _batch()
    masked = _masked(valid)
    pe = sinusoidal_positions(tokens.shape[1], D)
    for target_pos in (True, False):
        dec = VeinDecoder(D, target_pos=target_pos)
        out = dec(tokens, emb, valid, masked=masked)
        terms = []
        for b in range(tokens.shape[0]):
            pos = masked[b].nonzero().flatten()  # ascending = the prediction slots' order
            want = tokens[b, pos] + (pe[pos] if target_pos else 0)
            terms.append(1 - torch.cosine_similarity(out["pred"][b, :len(pos)], want, dim=-1))
        flat = torch.cat(terms)
        torch.testing.assert_close(out["loss"], flat.mean())
        torch.testing.assert_close(out["sum"], flat.sum())
        assert out["count"] == flat.numel()
        torch.testing.assert_close(out["per_sample"], torch.stack([t.mean() for t in terms]))


def test_mask_token_init():
    torch.manual_seed(0)
    big = 1024  # std of 1024 N(0, s²) draws: s·(1 ± 0.022·k), k < 4.5 bounds below
    assert 0.9 < VeinDecoder(big, mask_init="official").mask_token.std().item() < 1.1  # N(0, 1)
    # 0.02·(1 ± 0.1)
    assert 0.018 < VeinDecoder(big, mask_init="mae").mask_token.std().item() < 0.022
    with pytest.raises(ValueError, match="mask_init"):
        VeinDecoder(D, mask_init="zeros")


@pytest.mark.parametrize("memory", ["unmasked", "embedding"])
def test_what_each_memory_reads(memory):
    """``unmasked``: the visible tokens change the prediction; ``embedding``: they cannot
    (only e and the position queries), while e changes it in both."""
    torch.manual_seed(0)
    dec = VeinDecoder(D, memory=memory, target_pos=False).eval()
    tokens, emb, valid = _batch()
    masked = _masked(valid)
    base = dec(tokens, emb, valid, masked=masked)["pred"]
    other_visible = torch.where(masked[..., None], tokens, torch.randn_like(tokens))
    moved = dec(other_visible, emb, valid, masked=masked)["pred"]
    other_e = dec(tokens, torch.randn_like(emb), valid, masked=masked)["pred"]
    if memory == "unmasked":
        assert not torch.allclose(base, moved)
    else:
        torch.testing.assert_close(base, moved, rtol=0, atol=0)
    assert not torch.allclose(base, other_e)


def test_visible_ratio_picks_unmasked_tokens():
    torch.manual_seed(0)
    tokens, emb, valid = _batch()
    masked = _masked(valid)
    dec = VeinDecoder(D, memory="embedding", visible_ratio=0.2).eval()
    a = dec(tokens, emb, valid, masked=masked, generator=torch.Generator().manual_seed(1))["pred"]
    # Only the visible tokens are read: changing the others leaves the prediction alone, and
    # the visible subset is drawn among valid unmasked tokens (⌊0.2·n⌋ of them).
    g = torch.Generator().manual_seed(1)
    from fam.losses.vein import _draw
    free = valid & ~masked
    k = torch.minimum((valid.sum(1).double() * 0.2 + 1e-9).floor().long(), free.sum(1))
    visible = _draw(free, k, g)[0]
    assert visible.sum(1).tolist() == k.tolist() and not (visible & ~free).any()
    other = torch.where(visible[..., None], tokens, torch.randn_like(tokens))
    b = dec(other, emb, valid, masked=masked, generator=torch.Generator().manual_seed(1))["pred"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="visible_ratio"):
        VeinDecoder(D, memory="embedding", gamma=0.3, visible_ratio=0.8)
    with pytest.raises(ValueError, match="memory"):
        VeinDecoder(D, memory="tokens")


def test_shuffle_check_same_masks_and_dropout_rng_untouched():
    """loss_shuffled = the loss with e rolled by one sample, same masks; with dropout the
    same draws are replayed (identical e's give identical losses) and the caller's RNG
    stream is where the plain forward leaves it."""
    tokens, emb, valid = _batch()
    masked = _masked(valid)
    torch.manual_seed(0)
    dec = VeinDecoder(D).eval()
    out = dec(tokens, emb, valid, masked=masked, shuffle_check=True)
    want = dec(tokens, emb.roll(1, 0), valid, masked=masked)["loss"]
    torch.testing.assert_close(out["loss_shuffled"], want)
    assert out["loss_shuffled"].grad_fn is None
    one = dec(tokens[:1], emb[:1], valid[:1], shuffle_check=True)  # nothing to shuffle
    torch.testing.assert_close(one["loss_shuffled"], one["loss"].detach())

    torch.manual_seed(0)
    drop = VeinDecoder(D, dropout=0.3).train()
    same_e = emb[:1].expand_as(emb).contiguous()
    torch.manual_seed(5)
    r = drop(tokens, same_e, valid, masked=masked, shuffle_check=True)
    after_check = torch.rand(3)
    torch.testing.assert_close(r["loss_shuffled"], r["loss"].detach(), rtol=0, atol=0)
    torch.manual_seed(5)
    drop(tokens, same_e, valid, masked=masked)
    torch.testing.assert_close(torch.rand(3), after_check)


def test_head_sum_count_and_shuffle():
    torch.manual_seed(0)
    head = VeinHead(D, layers=[-2, -1], num_layers=5, memory="embedding")
    tokens, emb, valid = _batch()
    sample = torch.tensor([True, True, False, True])
    out = head({3: tokens, 4: tokens * 2}, {3: emb, 4: emb + 1}, valid, sample,
               generator=torch.Generator().manual_seed(0), shuffle_check=True)
    assert out["count"] == int(sum(max(1, int(0.3 * n)) for n in valid[sample].sum(1).tolist()))
    torch.testing.assert_close(out["loss"], out["sum"] / out["count"])
    torch.testing.assert_close(out["loss"], (out["per_layer"][3] + out["per_layer"][4]) / 2)
    assert out["loss_shuffled"].grad_fn is None and out["loss_shuffled"] > 0


def test_default_layers_follow_the_paper():
    assert default_vein_layers(2_200_000_000, 28) == [-3, -2, -1]  # Qwen2-VL-2B
    assert default_vein_layers(4_150_000_000, 32) == [-1]  # Phi-3.5-V
    assert default_vein_layers(8_290_000_000, 28) == [-1]  # Qwen2-VL-7B
    assert default_vein_layers(1_000_000, 2) == [-2, -1]  # a tiny 2-layer model: all layers


def test_global_mean_single_process_and_grad_norms():
    x = torch.randn(5, requires_grad=True)
    s = (x ** 2).sum()
    term, value, n = global_mean(s, 5, weight=0.5)
    torch.testing.assert_close(term, 0.5 * s / 5)
    torch.testing.assert_close(value, (s / 5).detach())
    assert n == 5 and value.grad_fn is None
    lin = torch.nn.Linear(3, 1)
    y = lin(torch.randn(4, 3)).sum()
    norms = grad_norms({"a": y, "b": 3 * y, "none": torch.tensor(1.0)}, lin.parameters())
    g = torch.autograd.grad(y, list(lin.parameters()), retain_graph=True)
    want = math.sqrt(sum(float(t.pow(2).sum()) for t in g))
    assert norms["a"] == pytest.approx(want) and norms["b"] == pytest.approx(3 * want)
    assert norms["none"] == 0.0
    y.backward()  # the graph was kept for the real backward


def test_verdict():
    assert vein_verdict(0.016076, 0.016077) is not None  # the measurement
    assert "teaches the model nothing" in vein_verdict(0.5, 0.5)
    assert vein_verdict(0.30, 0.45) is None
    assert vein_verdict(0.3, float("nan")) is None and vein_verdict(0.3, None) is None


# ------------------------------------------------------- the diagnostic on a tiny model
def _tiny_states(tiny_dirs, n_images=16):
    """Last-layer image-token states and EOS states of a tiny Qwen2-VL for distinct images."""
    from PIL import Image, ImageDraw

    from fam.backbones import load_backbone
    from fam.data.types import MMItem
    from fam.model import EmbeddingModel, select_tokens
    g = torch.Generator().manual_seed(0)
    images = []
    for _ in range(n_images):
        im = Image.new("RGB", (112, 112), (128, 128, 128))
        colour = tuple(int(c) for c in torch.randint(0, 256, (3,), generator=g))
        x0, y0 = (int(v) for v in torch.randint(0, 60, (2,), generator=g))
        ImageDraw.Draw(im).ellipse([x0, y0, x0 + 40, y0 + 40], fill=colour)
        images.append(im)
    emb = EmbeddingModel(load_backbone(tiny_dirs["qwen2_vl"])).eval()
    batch = emb.adapter.encode([MMItem("<|image_1|>\nRepresent the given image.")] * n_images,
                               images)
    with torch.no_grad():
        out = emb(batch, [-1])
    layer = emb.resolve_layer(-1)
    tokens, valid = select_tokens(out.hidden_states[layer], out.image_mask)
    return tokens, out.eos_state(layer), valid


def test_inversion_loss_depends_on_e_and_the_paper_diagnostic_is_reported(tiny_dirs):
    """On a tiny model's real states, after a few decoder steps: the inversion variant's
    L_rec rises clearly when each sample gets another's e; the paper variant's decoder,
    which sees 70 % of the tokens, depends on e far less; both report the diagnostic."""
    tokens, e, valid = _tiny_states(tiny_dirs)
    d = tokens.shape[-1]
    gaps = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for memory in ("embedding", "unmasked"):
            torch.manual_seed(0)
            head = VeinHead(d, layers=[-1], num_layers=2, memory=memory)
            opt = torch.optim.Adam(head.parameters(), lr=3e-3)
            for step in range(150):
                r = head({1: tokens}, {1: e}, valid, shuffle_check=True,
                         generator=torch.Generator().manual_seed(step))
                opt.zero_grad()
                r["loss"].backward()
                opt.step()
            with torch.no_grad():  # fresh masks, same for own and shuffled e
                r = head({1: tokens}, {1: e}, valid, shuffle_check=True,
                         generator=torch.Generator().manual_seed(999))
            own, shuf = r["loss"].item(), r["loss_shuffled"].item()
            assert 0 < own < 1 and shuf > 0
            gaps[memory] = (shuf - own) / own
    finally:
        torch.set_num_threads(threads)
    assert gaps["embedding"] > 0.05, gaps  # e carries what the decoder rebuilds
    assert gaps["unmasked"] < gaps["embedding"] / 2, gaps
