"""Shared fixtures: tiny backbones built once per session, offline."""
from __future__ import annotations

import os

import pytest
import torch
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny tensors gain nothing from intra-op threads; one thread also avoids OpenMP
# oversubscription when tests spawn DDP workers or run beside other jobs.
torch.set_num_threads(1)

CORPUS = ["a red circle left of a blue square", "a small green triangle above a yellow star",
          "Represent the given image.", "what colour is the circle?"]


class _TinyDirs(dict):
    """{family: saved tiny checkpoint}, each built on first use (a test needing only Qwen2-VL
    does not pay for the other families)."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, family):
        from fam.backbones import build_tiny
        build_tiny(family, self.root / family, size="xs", corpus=CORPUS, vocab_size=400, seed=0)
        self[family] = self.root / family
        return self[family]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Saved tiny checkpoints of every native family: {family: path}, built lazily, offline."""
    return _TinyDirs(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def scene_images(tmp_path):
    """Three small real PNGs (different sizes) under tmp_path/img."""
    d = tmp_path / "img"
    d.mkdir()
    paths = []
    for i, (size, col) in enumerate([((112, 112), (255, 0, 0)), ((150, 100), (0, 0, 255)),
                                     ((90, 130), (0, 200, 0))]):
        im = Image.new("RGB", size, (128, 128, 128))
        ImageDraw.Draw(im).ellipse([10, 10, 60, 60], fill=col)
        p = d / f"{i}.png"
        im.save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def qwen_lora(tiny_dirs, tmp_path_factory):
    """A saved LoRA adapter (peft folder) on the tiny Qwen2-VL, with a non-zero update (so
    merging it matters) and ``base_model_name_or_path`` naming that checkpoint."""
    pytest.importorskip("peft")
    import json

    from fam.backbones import load_backbone
    from fam.config import LoraConfig
    from fam.model import EmbeddingModel, apply_lora, save_lora
    emb = EmbeddingModel(load_backbone(tiny_dirs["qwen2_vl"]))
    apply_lora(emb, LoraConfig(enabled=True, r=4, alpha=8))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in emb.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("lora") / "adapter"
    save_lora(emb, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tiny_dirs["qwen2_vl"])
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="session")
def small_collection(tmp_path_factory):
    """A dozen drawn scenes and their items JSONL (ids, texts, images, a metadata field).

    Returns ``(items_path, image_root)``; images are ``img/<i>.png`` under the root.
    """
    root = tmp_path_factory.mktemp("collection")
    (root / "img").mkdir()
    colours = [(230, 30, 30), (30, 30, 230), (30, 200, 30), (240, 220, 30)]
    rows = []
    for i in range(12):
        im = Image.new("RGB", (112, 112), (40, 40, 40))
        d = ImageDraw.Draw(im)
        c = colours[i % 4]
        if i % 3 == 0:
            d.ellipse([10 + 4 * i, 20, 60 + 4 * i, 70], fill=c)
        elif i % 3 == 1:
            d.rectangle([20, 10 + 3 * i, 80, 60 + 3 * i], fill=c)
        else:
            d.polygon([(56, 10 + i), (100, 100), (12, 100)], fill=c)
        im.save(root / "img" / f"{i}.png")
        rows.append({"id": f"scene-{i}", "text": "<|image_1|>\nRepresent the given image.",
                     "image": f"img/{i}.png", "split": "test"})
    rows.append({"id": "caption-only", "text": "a red circle left of a blue square"})
    import json
    items = root / "items.jsonl"
    items.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return items, root


@pytest.fixture(scope="session")
def video_collection(tmp_path_factory):
    """Items with videos and several images (issue 18): a frame folder of 11 frames, a video
    as a list of 5 frame paths, an item with two images, a text item.

    Returns ``(items_path, image_root)``.
    """
    root = tmp_path_factory.mktemp("videos")
    for name, n, colour in (("a", 11, (230, 30, 30)), ("b", 5, (30, 30, 230))):
        (root / "vid" / name).mkdir(parents=True)
        for j in range(n):  # a square moving left to right
            im = Image.new("RGB", (56, 56), (40, 40, 40))
            ImageDraw.Draw(im).rectangle([4 * j, 20, 4 * j + 14, 34], fill=colour)
            im.save(root / "vid" / name / f"frame_{j}.png")
    (root / "img").mkdir()
    for j, colour in enumerate(((30, 200, 30), (240, 220, 30))):
        Image.new("RGB", (56, 56), colour).save(root / "img" / f"{j}.png")
    rows = [{"id": "clip-a", "text": "a red square moving right", "video": "vid/a"},
            {"id": "clip-b", "text": "<|video_1|>\na blue square",
             "video": [f"vid/b/frame_{j}.png" for j in range(5)]},
            {"id": "pair", "text": "<|image_2|> beside <|image_1|>",
             "images": ["img/0.png", "img/1.png"]},
            {"id": "words", "text": "a green and a yellow square"}]
    import json
    items = root / "items.jsonl"
    items.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return items, root
