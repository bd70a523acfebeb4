"""Patch-aligned projector training (method.md §4): gradients, frozen towers, geometry, save/load."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fam.pad.records import parse_pad_record, read_pad
from fam.projector.geometry import processor_transform
from fam.projector.hooks import ProjectorTap, projector_module
from fam.projector.regions import label_token_ids, region_targets
from fam.backbones import load_backbone
from fam.config import OptimConfig, RunConfig
from fam.data.rle import rle_decode, rle_encode
from fam.losses.patch import label_embedding, patch_alignment_loss
from fam.projector.recipe import (PatchAlignedLoss, ProjectorConfig, ProjectorModule,
                                  build_projector_samples, collate_projector,
                                  is_linear_projector, run_projector, setup_projector)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """A very small Scenes benchmark and a tiny LLaVA whose tokenizer knows its words."""
    import json

    from fam.backbones import build_tiny
    from fam.data.scenes import ScenesConfig, generate_scenes
    root = tmp_path_factory.mktemp("proj")
    data = root / "data"
    generate_scenes(ScenesConfig(n_train_images=16, n_eval_images=12, n_ood_images=12,
                                 eval_rows=4, n_candidates=4), data)
    caps = json.loads((data / "captions.json").read_text())
    build_tiny("llava", root / "tiny", size="xs", image_size=112,
               corpus=[c["caption"] for c in caps], seed=0)
    return {"data": data, "model": root / "tiny", "root": root}


def _adapter_and_batch(scenes, kind="mlp", n=4):
    adapter = load_backbone(scenes["model"])
    setup_projector(adapter, kind, reinit=True, seed=0)
    samples = build_projector_samples(adapter, scenes["data"] / "captions.json",
                                      scenes["data"] / "pad.jsonl", scenes["data"])
    batch = collate_projector(adapter, samples[:n])
    return adapter, batch


def _grads(adapter):
    return {n: (p.grad.clone() if p.grad is not None else None)
            for n, p in adapter.model.named_parameters()}


def test_beta0_gives_exactly_caption_gradients_and_towers_get_none(scenes):
    adapter, batch = _adapter_and_batch(scenes)
    assert int(batch.patch_sets.shape[0]) > 0  # the batch has regions: the patch term exists
    proj_names = {n for n, p in adapter.model.named_parameters() if p.requires_grad}
    assert proj_names and all("multi_modal_projector" in n for n in proj_names)

    adapter.model.train()
    ref_loss = adapter.generative_loss(batch.enc, batch.labels)
    ref_loss.backward()
    ref = _grads(adapter)
    adapter.model.zero_grad(set_to_none=True)

    for beta_max, step in ((0.0, 7), (5.0, 0)):  # baseline; and the ramp's first step (β=0)
        module = ProjectorModule(adapter)
        loss = PatchAlignedLoss(total_steps=10, beta_max=beta_max)
        terms = loss(**module(batch, step), batch=batch, step=step)
        assert float(terms["beta"]) == 0.0
        assert float(terms["patch"]) > 0  # computed for logging...
        terms["loss"].backward()
        got = _grads(adapter)
        for n in proj_names:  # ...but exactly the caption-only gradients
            assert torch.equal(got[n], ref[n]), n
        for n, g in got.items():
            if n not in proj_names:
                assert g is None, f"frozen parameter {n} received a gradient"
        adapter.model.zero_grad(set_to_none=True)

    # with β > 0 the patch term changes the projector's gradients
    module, loss = ProjectorModule(adapter), PatchAlignedLoss(total_steps=10, beta_max=5.0)
    loss(**module(batch, 5), batch=batch, step=5)["loss"].backward()
    got = _grads(adapter)
    assert any(not torch.equal(got[n], ref[n]) for n in proj_names)


def test_projector_tokens_are_the_llm_image_inputs_in_order(scenes):
    adapter, batch = _adapter_and_batch(scenes, n=2)
    with torch.no_grad(), ProjectorTap(projector_module(adapter.model)) as tap:
        out = adapter.forward(batch.enc)
    h0 = out.hidden_states[0]                                   # (B, L, d) LLM input
    for b in range(2):
        seq = h0[b][batch.enc.image_mask[b]]                    # image positions, in order
        assert torch.allclose(seq, tap.output[b], atol=1e-6)


def test_patch_loss_decreases_when_trained_alone(scenes):
    adapter, batch = _adapter_and_batch(scenes, n=4)
    hf = adapter.hf_model
    proj = projector_module(hf)
    opt = torch.optim.Adam([p for p in proj.parameters() if p.requires_grad], lr=1e-2)
    t = label_embedding(batch.label_ids, adapter.input_embeddings().weight)
    pv = batch.enc.inputs["pixel_values"]
    losses = []
    for _ in range(40):
        with ProjectorTap(proj) as tap:
            hf.model.get_image_features(pixel_values=pv)
        loss = patch_alignment_loss(tap.output, batch.patch_sets, t, batch.image_index)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses[::8]


def test_label_tokens_are_the_mid_sentence_form(scenes):
    adapter = load_backbone(scenes["model"])
    tok = adapter.tokenizer
    ids = label_token_ids(tok, "red circle")
    # exactly the tokens "red circle" gets inside a caption
    ctx = tok("a small red circle", add_special_tokens=False)["input_ids"]
    assert ids == ctx[-len(ids):]
    assert all(i not in tok.all_special_ids for i in ids)


@pytest.mark.parametrize("pad_lr,pad_tb", [(19, 0), (0, 13), (29, 7)])
def test_region_coverage_matches_the_image_processor(scenes, pad_lr, pad_tb):
    """A Scenes region, put on a non-square canvas, covers the patches that the processor's
    own pixels say it covers (resize + center crop are applied identically)."""
    adapter = load_backbone(scenes["model"])
    rec = read_pad(scenes["data"] / "pad.jsonl", select="images/train/")[0]
    reg = rec.regions[0]
    m = rle_decode(reg.mask)
    mask = np.pad(m, ((pad_tb, pad_tb + 3), (pad_lr, 2 * pad_lr + 1)))  # (H, W) non-square
    h, w = mask.shape
    rec2 = parse_pad_record({"image": rec.image, "width": w, "height": h,
                             "regions": [{"label": reg.label, "score": 1.0, "box": [0, 0, w, h],
                                          "mask": rle_encode(mask)}]})
    tgt = region_targets(rec2, adapter, theta=0.5)
    cov = tgt.coverage[0].reshape(tgt.grid)

    from PIL import Image
    proc = adapter.image_processor
    im = Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB")
    pv = proc([im], return_tensors="pt")["pixel_values"][0, 0].numpy()  # (112, 112)
    pix = (pv * proc.image_std[0] + proc.image_mean[0]).clip(0, 1)       # back to [0, 1]
    p = adapter.config.vision_config.patch_size
    gh, gw = tgt.grid
    ref = pix[:gh * p, :gw * p].reshape(gh, p, gw, p).mean(axis=(1, 3))
    assert np.abs(cov - ref).max() < 0.03
    tf = processor_transform(proc, (h, w), p)
    assert tf.final_size == (112, 112)
    assert cov.sum() > 0
    sel = tgt.patch_sets[0].reshape(gh, gw)
    clear = np.abs(ref - 0.5) > 0.05  # away from the threshold the two selections agree
    assert np.array_equal(sel[clear], (ref >= 0.5)[clear] | (sel[clear] & (ref.max() < 0.5)))


def test_linear_projector_is_one_linear_map_and_round_trips(scenes, tmp_path):
    adapter = load_backbone(scenes["model"])
    proj = setup_projector(adapter, "linear", reinit=True, seed=3)
    assert is_linear_projector(proj)
    assert adapter.config.projector_hidden_act == "linear"
    trainable = [n for n, p in adapter.model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(f"model.multi_modal_projector.linear_1.{k}"
                                       for k in ("weight", "bias"))
    x = torch.randn(2, 5, proj.linear_1.in_features)
    with torch.no_grad():
        proj.linear_1.weight.add_(0.1)  # as if trained
        y = proj(x)
    # float32 linear layer vs the same matmul written out: summation order only
    assert torch.allclose(y, x @ proj.linear_1.weight.T + proj.linear_1.bias, atol=1e-6)
    adapter.save_pretrained(tmp_path / "lin")
    back = load_backbone(tmp_path / "lin")
    p2 = projector_module(back.model)
    assert is_linear_projector(p2)
    with torch.no_grad():
        assert torch.equal(p2(x), y)
    # continuing to train a saved linear projector keeps it linear
    setup_projector(back, "linear", reinit=False)
    with pytest.raises(Exception, match="linear"):
        setup_projector(load_backbone(tmp_path / "lin"), "mlp", reinit=False)


def test_run_projector_trains_only_the_projector_and_resumes(scenes, tmp_path):
    from safetensors.torch import load_file
    cfg = ProjectorConfig(model=str(scenes["model"]),
                          captions=str(scenes["data"] / "captions.json"),
                          pad=str(scenes["data"] / "pad.jsonl"), beta_max=5.0,
                          optim=OptimConfig(lr=1e-2, batch_size=4, steps=3, warmup_ratio=0.0),
                          run=RunConfig(out_dir=str(tmp_path / "run"), save_every=2,
                                        progress=False, log_every=1))
    path = run_projector(cfg)
    before = load_file(str(scenes["model"] / "model.safetensors"))
    after = load_file(str(path / "model.safetensors"))
    assert before.keys() == after.keys()
    for k in before:
        if "multi_modal_projector" in k:
            assert not torch.equal(before[k], after[k]), k
        else:
            assert torch.equal(before[k], after[k]), f"frozen weight {k} changed"
    assert (tmp_path / "run" / "projector.json").exists()
    # a second call with resume finds the finished model
    assert run_projector(cfg) == path


def test_config_validation():
    from fam.errors import ConfigError
    with pytest.raises(ConfigError, match="projector"):
        ProjectorConfig(model="m", captions="c", pad="p", projector="conv").validate()
    with pytest.raises(ConfigError, match="pad"):
        ProjectorConfig(model="m", captions="c", beta_max=5).validate()
    ProjectorConfig(model="m", captions="c", beta_max=0).validate()  # caption-only needs no PAD
