"""The C-Abstractor as a projector type: saved with the model and rebuilt on load, regions
on the pooled grid, the projector stage (exact resume) and the SFT stage on top of it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fam.backbones import load_backbone
from fam.backbones.cabstractor import SPEC_KEY, CAbstractor
from fam.config import CAbstractorConfig, OptimConfig, ProjectorConfig, RunConfig
from fam.errors import ConfigError
from fam.pad.records import read_pad
from fam.projector.cabstractor import pool_coverage
from fam.projector.geometry import mask_to_patch_coverage, processor_transform, select_patches
from fam.projector.hooks import projector_module, vision_tokens
from fam.projector.recipe import (ProjectorModule, build_projector_samples, collate_projector,
                                  projector_kind, run_projector, setup_projector)
from fam.projector.regions import region_targets, token_layout
from fam.data.rle import rle_decode

CAB = CAbstractorConfig(pooled=[4, 4], depth=1)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """A very small textured Scenes benchmark and a tiny LLaVA whose tokenizer knows it."""
    from fam.backbones import build_tiny
    from fam.data.scenes import ScenesConfig, generate_scenes
    root = tmp_path_factory.mktemp("cab")
    data = root / "data"
    generate_scenes(ScenesConfig(n_train_images=12, n_eval_images=8, n_ood_images=8,
                                 eval_rows=4, n_candidates=4, background_texture=25), data,
                    progress=False)
    caps = json.loads((data / "captions.json").read_text())
    build_tiny("llava", root / "tiny", size="xs", image_size=112,
               corpus=[c["caption"] for c in caps], seed=0)
    return {"data": data, "model": root / "tiny", "root": root}


def _cab_adapter(scenes, seed=0):
    adapter = load_backbone(scenes["model"])
    setup_projector(adapter, "cabstractor", reinit=True, seed=seed, cabstractor=CAB)
    return adapter


def test_saved_and_rebuilt_on_load_with_identical_outputs(scenes, tmp_path):
    adapter = _cab_adapter(scenes)
    proj = projector_module(adapter.model)
    assert isinstance(proj, CAbstractor) and projector_kind(proj) == "cabstractor"
    trainable = {n for n, p in adapter.model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.multi_modal_projector.{n}" for n, _ in proj.named_parameters()}
    assert adapter.num_image_tokens(112, 112) == 16 and token_layout(adapter) == (4, 4, 0)
    with torch.no_grad():
        for p in proj.parameters():     # as if trained: not the initialisation
            p.add_(0.01 * torch.randn_like(p))
    adapter.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg[SPEC_KEY]["type"] == "cabstractor" and cfg[SPEC_KEY]["pooled"] == [4, 4]

    back = load_backbone(tmp_path / "m")
    assert isinstance(projector_module(back.model), CAbstractor)
    a, b = adapter.hf_model.state_dict(), back.hf_model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    img = [Image.open(scenes["data"] / "images/train/tr00000.png")]
    x0, y0 = vision_tokens(adapter, img)
    x1, y1 = vision_tokens(back, img)
    assert y0.shape == (1, 16, adapter.hidden_size) and x0.shape[1] == 64
    assert torch.equal(y0, y1)
    # the LLM reads 16 image tokens and the generative loss is the same before and after
    samples = build_projector_samples(back, scenes["data"] / "captions.json",
                                      scenes["data"] / "pad.jsonl", scenes["data"])
    batch = collate_projector(back, samples[:2])
    assert int(batch.enc.image_mask[0].sum()) == 16 and batch.patch_sets.shape[1] == 16
    adapter.model.eval()
    back.model.eval()
    with torch.no_grad():
        assert torch.equal(adapter.generative_loss(batch.enc, batch.labels),
                           back.generative_loss(batch.enc, batch.labels))


def test_regions_are_the_patch_coverage_pooled_then_thresholded(scenes):
    adapter = _cab_adapter(scenes)
    rec = read_pad(scenes["data"] / "pad.jsonl", scenes["data"])[0]
    tgt = region_targets(rec, adapter, theta=0.5)
    assert tgt.grid == (4, 4) and tgt.patch_sets.shape == (len(rec.regions), 16)
    assert tgt.indices == list(range(len(rec.regions)))
    tf = processor_transform(adapter.image_processor, (rec.height, rec.width), 14)
    masks = np.stack([rle_decode(r.mask) for r in rec.regions])
    cov8 = mask_to_patch_coverage(masks, tf, level="token").reshape(len(masks), 64)
    ref = pool_coverage(cov8, (8, 8), (4, 4))
    # float32 coverage fractions pooled by two code paths: rounding only
    np.testing.assert_allclose(tgt.coverage, ref, rtol=0, atol=1e-6)
    assert np.array_equal(tgt.patch_sets, select_patches(ref, 0.5, flat=True))


def test_reinit_false_checks_the_type_and_bad_shapes_are_named(scenes, tmp_path):
    adapter = _cab_adapter(scenes)
    adapter.save_pretrained(tmp_path / "m")
    setup_projector(load_backbone(tmp_path / "m"), "cabstractor", reinit=False)
    with pytest.raises(ConfigError, match="cabstractor projector"):
        setup_projector(load_backbone(tmp_path / "m"), "mlp", reinit=False)
    with pytest.raises(ConfigError, match="exceeds the 8x8 patch grid"):
        setup_projector(load_backbone(scenes["model"]), "cabstractor",
                        cabstractor=CAbstractorConfig(pooled=[9, 4]))
    # back to an MLP: the record goes, the image block is the patch grid again
    mlp = load_backbone(tmp_path / "m")
    setup_projector(mlp, "mlp", reinit=True)
    assert not hasattr(mlp.config, SPEC_KEY) and mlp.num_image_tokens(112, 112) == 64
    # a corrupt record is one clear error
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg[SPEC_KEY]["type"] = "perceiver"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="fam_projector"):
        load_backbone(tmp_path / "m")
    with pytest.raises(ConfigError, match="pooled"):
        CAbstractorConfig(pooled=[4]).validate()


def test_projector_stage_trains_only_the_abstractor_and_resumes_exactly(scenes, tmp_path,
                                                                        monkeypatch):
    def cfg(out):
        return ProjectorConfig(
            model=str(scenes["model"]), captions=str(scenes["data"] / "captions.json"),
            pad=str(scenes["data"] / "pad.jsonl"), projector="cabstractor", cabstractor=CAB,
            beta_max=5.0, beta_schedule="constant",
            optim=OptimConfig(lr=1e-2, batch_size=4, steps=4, warmup_ratio=0.0),
            run=RunConfig(out_dir=str(out), save_every=2, progress=False, log_every=1))
    full = run_projector(cfg(tmp_path / "full"))
    before = load_file(str(scenes["model"] / "model.safetensors"))
    after = load_file(str(full / "model.safetensors"))
    assert {k for k in after if "multi_modal_projector" in k} != \
        {k for k in before if "multi_modal_projector" in k}           # another module
    for k in before:
        if "multi_modal_projector" not in k:
            assert torch.equal(before[k], after[k]), f"frozen weight {k} changed"
    meta = json.loads((tmp_path / "full" / "projector.json").read_text())
    assert meta["type"] == "cabstractor" and meta["beta_schedule"] == "constant"

    orig = ProjectorModule.forward

    def crash(self, batch, step=0):
        if step == 3:
            raise KeyboardInterrupt
        return orig(self, batch, step)
    monkeypatch.setattr(ProjectorModule, "forward", crash)
    with pytest.raises(KeyboardInterrupt):
        run_projector(cfg(tmp_path / "part"))
    monkeypatch.setattr(ProjectorModule, "forward", orig)
    resumed = load_file(str(run_projector(cfg(tmp_path / "part")) / "model.safetensors"))
    for k in after:
        torch.testing.assert_close(resumed[k], after[k], rtol=0, atol=0)


def test_constant_schedule_is_beta_max_from_the_first_step():
    from fam.projector.recipe import PatchAlignedLoss
    ramp = PatchAlignedLoss(total_steps=10, beta_max=5.0)
    const = PatchAlignedLoss(total_steps=10, beta_max=5.0, constant=True)
    assert ramp.beta(0) == 0.0 and ramp.beta(5) == 2.5 and ramp.beta(10) == 5.0
    assert [const.beta(s) for s in (0, 5, 10)] == [5.0, 5.0, 5.0]
    assert PatchAlignedLoss(total_steps=10, beta_max=0.0, constant=True).beta(0) == 0.0
