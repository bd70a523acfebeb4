"""Stage 0, MAC alignment and adaptation (baseline and VEIN) on tiny data, end to end."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from fam.backbones import build_tiny, load_backbone
from fam.config import (AdaptConfig, LoraConfig, OptimConfig, RunConfig, Stage0Config,
                        VeinConfig)
from fam.errors import DataError


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from fam.data.scenes import ScenesConfig, generate_scenes
    root = tmp_path_factory.mktemp("bench")
    generate_scenes(ScenesConfig(seed=0, n_train_images=40, n_eval_images=12, n_ood_images=6,
                                 eval_rows=6, n_candidates=4), root / "data", progress=False)
    caps = [c["caption"] for c in json.loads((root / "data" / "captions.json").read_text())]
    build_tiny("qwen2_vl", root / "tiny", size="xs", corpus=caps, vocab_size=400)
    return root


def _run(out, steps=3, save_every=0):
    return RunConfig(out_dir=str(out), save_every=save_every, progress=False, log_every=1)


def _weights(model_dir):
    keys = []
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            keys += list(sf.keys())
    return keys


def test_stage0_trains_and_saves_a_loadable_generative_model(bench, tmp_path):
    from fam.data.captions import load_captions
    from fam.train.stage0 import generative_eval_loss, run_stage0
    data = bench / "data"
    cfg = Stage0Config(model=str(bench / "tiny"), captions=str(data / "captions.json"),
                       qa=str(data / "qa.json"), image_root=str(data),
                       optim=OptimConfig(lr=3e-3, batch_size=8, steps=12, warmup_ratio=0.0),
                       run=_run(tmp_path))
    path = run_stage0(cfg)
    samples = load_captions(data / "captions.json", data)[:16]
    before = generative_eval_loss(load_backbone(bench / "tiny"), samples)
    after = generative_eval_loss(load_backbone(path), samples)
    assert after < before - 0.5  # it learned the captions' language
    assert json.loads((tmp_path / "train_metrics.json").read_text())["steps"] == 12


def _adapt_cfg(bench, out, **kw):
    data = bench / "data"
    base = dict(model=str(bench / "tiny"), train_dir=str(data / "train"), image_root=str(data),
                optim=OptimConfig(lr=1e-3, batch_size=8, steps=3),
                lora=LoraConfig(enabled=True, r=4, alpha=8), run=_run(out))
    base.update(kw)
    return AdaptConfig(**base)


def test_adapt_with_vein_exports_a_clean_model(bench, tmp_path):
    from fam.train.adapt import run_adapt
    cfg = _adapt_cfg(bench, tmp_path, vein=VeinConfig(enabled=True, layers=[-2, -1]))
    path = run_adapt(cfg)
    keys = _weights(path)
    assert keys and not any("lora" in k or "vein" in k or "decoder" in k for k in keys)
    m = json.loads((tmp_path / "train_metrics.json").read_text())
    assert m["stage"] == "adapt+vein" and "rec_loss" in m["final"]
    assert 0.0 <= m["final"]["rec_loss"] <= 2.0
    # the exported model loads as a normal checkpoint
    a = load_backbone(path)
    assert a.config.model_type == "qwen2_vl"
    # a finished stage is not run again
    assert run_adapt(cfg) == path


@pytest.mark.parametrize("memory", ["unmasked", "embedding"])
def test_vein_diagnostic_in_log_tensorboard_and_summary(bench, tmp_path, memory, caplog):
    """Both variants report rec_loss_shuffled (every step) and the gradient norms VEIN and
    the task send into the backbone (at log steps), in train_metrics.json and tensorboard;
    when the two losses are equal the log and the summary say VEIN teaches nothing."""
    from fam.train.adapt import run_adapt
    cfg = _adapt_cfg(bench, tmp_path, vein=VeinConfig(enabled=True, layers=[-1], memory=memory))
    with caplog.at_level("INFO", logger="fam.train.trainer"):
        run_adapt(cfg)
    m = json.loads((tmp_path / "train_metrics.json").read_text())
    f = m["final"]
    assert f["rec_loss"] > 0 and f["rec_loss_shuffled"] > 0
    assert f["task_grad_norm"] > 0 and f["vein_grad_norm"] > 0
    from fam.losses.vein import vein_verdict
    said = vein_verdict(f["rec_loss"], f["rec_loss_shuffled"], memory=memory)
    assert m.get("notes", []) == ([said] if said else [])
    if said:
        # The paper's VEIN ignoring e is what the README's ablation found: information, not
        # a warning that tells the user to switch; the inversion variant's is a warning.
        level = "INFO" if memory == "unmasked" else "WARNING"
        said_at = {r.levelname for r in caplog.records
                   if "teaches the model nothing" in r.getMessage()}
        assert said_at == {level} and "try vein.memory" not in caplog.text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(tmp_path / "tensorboard"))
    ev.Reload()
    tags = set(ev.Tags()["scalars"])
    assert {"adapt+vein/rec_loss", "adapt+vein/rec_loss_shuffled",
            "adapt+vein/vein_grad_norm", "adapt+vein/task_grad_norm"} <= tags


def test_align_merges_lora_and_improves_the_mac_loss(bench, tmp_path):
    from fam.train.align import AlignCollator, AlignConfig, MACLoss, MACModule, run_align
    from fam.model import EmbeddingModel
    from fam.data.captions import load_captions
    data = bench / "data"
    cfg = AlignConfig(model=str(bench / "tiny"), captions=str(data / "captions.json"),
                      image_root=str(data), optim=OptimConfig(lr=3e-3, batch_size=8, steps=8),
                      lora=LoraConfig(enabled=True, r=4, alpha=8), run=_run(tmp_path))
    path = run_align(cfg)
    assert not any("lora" in k for k in _weights(path))
    samples = load_captions(data / "captions.json", data)[:8]

    def mac(model_dir):
        a = load_backbone(model_dir)
        m = MACModule(EmbeddingModel(a)).eval()
        with torch.no_grad():
            return MACLoss()(**m(AlignCollator(a, cfg.image_instruction,
                                               cfg.text_instruction)(samples)))
    before, after = mac(bench / "tiny"), mac(path)
    assert set(before) == {"loss", "coarse_loss", "c2f_loss", "fine_loss"}
    assert after["loss"] < before["loss"]


def test_bad_data_stops_with_row_and_keeps_checkpoints(bench, tmp_path):
    from fam.train.adapt import run_adapt
    data = tmp_path / "data"
    shutil.copytree(bench / "data", data)
    cfg = _adapt_cfg(bench, tmp_path / "run", train_dir=str(data / "train"),
                     image_root=str(data), optim=OptimConfig(lr=1e-3, batch_size=8, steps=2))
    cfg.run.save_every = 1
    cfg.run.keep_checkpoints = 5
    run_adapt(cfg)
    shutil.rmtree(tmp_path / "run" / "model")  # pretend the stage was longer
    for png in (data / "images" / "train").glob("*.png"):
        png.write_bytes(b"not a png")
    cfg.optim.steps = 4
    cfg.run.on_change = "extend"  # more steps on the same run (else refused: issue 8)
    with pytest.raises(DataError) as ei:
        run_adapt(cfg)
    msg = str(ei.value)
    assert ".jsonl" in msg and "line" in msg and "image_path" in msg and "corrupt" in msg
    ck = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert "step-2" in ck  # the work done before the bad row is still there


def test_malformed_training_row_names_file_line_field(bench, tmp_path):
    from fam.train.adapt import run_adapt
    data = tmp_path / "data"
    shutil.copytree(bench / "data", data)
    f = data / "train" / "Scenes-Count.jsonl"
    lines = f.read_text().splitlines()
    row = json.loads(lines[2])
    del row["pos_text"]
    lines[2] = json.dumps(row)
    f.write_text("\n".join(lines) + "\n")
    cfg = _adapt_cfg(bench, tmp_path / "run", train_dir=str(data / "train"), image_root=str(data))
    with pytest.raises(DataError) as ei:
        run_adapt(cfg)
    assert "Scenes-Count.jsonl" in str(ei.value) and "line 3" in str(ei.value)
    assert "pos_text" in str(ei.value)


def test_adapt_also_saves_the_lora_adapter_which_reloads_exactly(bench, tmp_path):
    from fam.data.types import MMItem
    from fam.model import EmbeddingModel, load_lora
    from fam.train.adapt import run_adapt
    cfg = _adapt_cfg(bench, tmp_path)
    merged_dir = run_adapt(cfg)
    adapter_dir = tmp_path / "adapter"
    assert (adapter_dir / "adapter_config.json").exists()
    img = sorted((bench / "data" / "images" / "eval").glob("*.png"))[0]
    items = [MMItem("<|image_1|>\nRepresent the given image.", img), MMItem("a red circle")]
    merged = EmbeddingModel(load_backbone(merged_dir)).eval()
    base = EmbeddingModel(load_backbone(bench / "tiny"))
    load_lora(base, adapter_dir)
    base.eval()
    with torch.no_grad():
        e1 = merged(merged.adapter.encode(items)).embedding
        e2 = base(base.adapter.encode(items)).embedding
    # float32: merged weights vs base + LoRA adapter round differently (as the merge tests)
    torch.testing.assert_close(e2, e1, rtol=1e-4, atol=1e-5)


def test_adapt_in_vlm2vec_format_records_its_inputs_in_the_saved_model(bench, tmp_path):
    """backbone.* options reach training, and the exported model keeps them for eval/export."""
    from fam.config import BackboneConfig
    from fam.train.adapt import run_adapt
    cfg = _adapt_cfg(bench, tmp_path, max_text_tokens=None,
                     backbone=BackboneConfig(prompt_format="vlm2vec", image_resolution="low",
                                             min_pixels=56 * 56, max_pixels=28 * 28 * 16))
    path = run_adapt(cfg)
    saved = json.loads((path / "fam_backbone.json").read_text())
    assert saved == {"family": "qwen2_vl", "prompt_format": "vlm2vec", "image_resolution": "low",
                     "max_text_tokens": None, "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16}
    a = load_backbone(path)  # what eval, encode and export get by default
    assert (a.prompt_format, a.image_resolution, a.max_text_tokens, a.pixel_budget) == \
        ("vlm2vec", "low", None, (56 * 56, 28 * 28 * 16))


def test_pair_collator_hands_images_over_in_their_own_mode(bench, tmp_path):
    """RGBA reaches the adapter unconverted, so each format's rule applies (docs/vlm2vec.md)."""
    import numpy as np
    from PIL import Image

    from fam.data.mmeb import TrainPair
    from fam.data.types import MMItem
    from fam.train.adapt import PairCollator
    arr = np.random.default_rng(0).integers(0, 256, (60, 90, 4), dtype=np.uint8)
    arr[..., 3] = np.linspace(0, 255, 90, dtype=np.uint8)[None]
    Image.fromarray(arr, "RGBA").save(tmp_path / "rgba.png")
    rgba = Image.open(tmp_path / "rgba.png")
    q = MMItem("<|image_1|>\nRepresent the given image.", tmp_path / "rgba.png")
    pair = TrainPair(q, MMItem("a label"), None, "Scenes-T2I", str(tmp_path / "x.jsonl"), 1)
    for fmt, rgb in (("fam", None), ("vlm2vec", rgba.convert("RGB"))):
        a = load_backbone(bench / "tiny", prompt_format=fmt)
        batch = PairCollator(a, hard_negatives=False)([pair])
        want = a.image_processor(images=[rgb if rgb is not None else rgba],
                                 return_tensors="pt")["pixel_values"]
        assert torch.equal(batch.query.inputs["pixel_values"], want), fmt


def test_stage0_can_keep_the_vision_tower_frozen(bench, tmp_path):
    from safetensors.torch import load_file
    from fam.train.stage0 import run_stage0
    data = bench / "data"
    cfg = Stage0Config(model=str(bench / "tiny"), captions=str(data / "captions.json"),
                       image_root=str(data), freeze_vision=True,
                       optim=OptimConfig(lr=3e-3, batch_size=4, steps=2, warmup_ratio=0.0),
                       run=_run(tmp_path))
    before = {k: v for f in (bench / "tiny").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    after = {k: v for f in run_stage0(cfg).glob("*.safetensors") for k, v in load_file(str(f)).items()}
    vision = [k for k in before if k.startswith(("visual.", "model.visual."))]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in before if k not in vision)


def test_text_only_stage0_trains_the_language_model_on_words_alone(bench, tmp_path):
    from safetensors.torch import load_file
    from fam.data.captions import as_text_samples, load_captions, load_qa
    from fam.train.stage0 import build_generative_batch, run_stage0
    data = bench / "data"
    caps = load_captions(data / "captions.json", data)
    qa = load_qa(data / "qa.json", data)
    text = as_text_samples(caps[:2], qa[:1], {c.image: c.target for c in caps})
    assert all(s.image is None for s in text)
    assert text[0].prompt == "" and text[0].target == caps[0].target
    assert text[2].prompt.startswith({c.image: c.target for c in caps}[qa[0].image] + "\n")
    adapter = load_backbone(bench / "tiny")
    enc, labels = build_generative_batch(adapter, text)
    assert not enc.image_mask.any() and "pixel_values" not in enc.inputs
    # labels on the answer (and EOS) only: the caption before the question is context
    n_answer = len(adapter.tokenizer(" " + qa[0].target, add_special_tokens=False)["input_ids"])
    assert int((labels[2] != -100).sum()) <= n_answer + 1

    cfg = Stage0Config(model=str(bench / "tiny"), captions=str(data / "captions.json"),
                       qa=str(data / "qa.json"), image_root=str(data), text_only=True,
                       optim=OptimConfig(lr=3e-3, batch_size=4, steps=2, warmup_ratio=0.0),
                       run=_run(tmp_path))
    before = {k: v for f in (bench / "tiny").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    after = {k: v for f in run_stage0(cfg).glob("*.safetensors") for k, v in load_file(str(f)).items()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # (Qwen2-VL: the vision tower and its merger, the projector, are under "visual.")
    assert changed and not any("visual" in k for k in changed)
    assert any("lm_head" in k for k in changed) and any("layers.0." in k for k in changed)


def test_cli_adapt_with_multivector_trains_and_exports_its_head(bench, tmp_path):
    """`fam train adapt ... multivector.enabled=true`: both losses logged, the head saved
    beside the model and read back."""
    from fam.cli import main
    from fam.model.multivector import load_multivector
    data = bench / "data"
    rc = main(["train", "adapt", f"model={bench / 'tiny'}", f"train_dir={data / 'train'}",
               f"image_root={data}", "optim.batch_size=8", "optim.steps=4", "optim.lr=2e-3",
               "lora.r=4", "lora.alpha=8", f"run.out_dir={tmp_path}", "run.log_every=1",
               "run.save_every=0", "run.progress=false", "multivector.enabled=true",
               "multivector.dim=16", "multivector.tokens=all"])
    assert rc == 0
    m = json.loads((tmp_path / "train_metrics.json").read_text())
    assert m["stage"] == "adapt+multivector" and {"mv_loss", "mv_accuracy", "task_loss"} <= set(m["final"])
    head = load_multivector(tmp_path / "model", load_backbone(tmp_path / "model").hidden_size)
    assert head.dim == 16 and head.tokens == "all" and head.proj is not None
    assert not any("multivector" in k for k in _weights(tmp_path / "model"))  # not in the LM
