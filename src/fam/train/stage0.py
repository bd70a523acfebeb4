"""Stage 0: generative pre-training of a tiny LVLM (next-token loss on captions and answers).

The papers start from a pretrained generative LVLM (Qwen2-VL, LLaVA). Offline there is none,
so the default pipeline first teaches the tiny random-initialised model to caption images and
answer questions about them, exactly the objective such models are pretrained with. The
result is saved as a normal checkpoint directory that every later stage loads like a real
checkpoint.

Caption data is read in the LLaVA pre-training formats: a JSON list of
``{"image", "caption" | "blip_caption"}`` (``blip_laion_cc_sbu_558k_meta.json``) or of
``{"image", "conversations": [{"from": "human", ...}, {"from": "gpt", "value": caption}]}``
(``blip_laion_cc_sbu_558k.json``).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fam.backbones import load_backbone
from fam.backbones.base import BackboneAdapter, EncodedBatch
from fam.config import Stage0Config, to_dict
from fam.data.types import IMAGE_PLACEHOLDER, MMItem
from fam.errors import DataError
from fam.train.trainer import Trainer
from fam.utils.io import resolve_under

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptionSample:
    """An image with a prompt and the text the model must generate after it."""

    image: Path
    prompt: str
    target: str
    source: str
    line: int
    field: str


def _read_json_list(path: Path) -> list[Any]:
    if not path.exists():
        raise DataError("file not found", path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e.msg}, line {e.lineno} column {e.colno})", path,
                        e.lineno) from None
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of records, got {type(data).__name__}", path)
    return data


def load_captions(path: str | Path, image_root: str | Path, prompt: str = "Describe the image.",
                  ) -> list[CaptionSample]:
    """Read LLaVA pre-training captions (either published layout) into samples.

    Raises:
        DataError: a record is not an object, lacks ``image`` or a caption, or its image
            path escapes ``image_root`` (names the file, record number and field).
    """
    path = Path(path)
    out = []
    for i, rec in enumerate(_read_json_list(path), start=1):
        if not isinstance(rec, dict):
            raise DataError(f"expected an object, got {type(rec).__name__}", path, i)
        img = rec.get("image")
        if not isinstance(img, str) or not img:
            raise DataError("missing or empty image path", path, i, "image")
        image = resolve_under(image_root, img, source=path, line=i, field="image")
        cap = None
        for key in ("caption", "blip_caption"):
            if isinstance(rec.get(key), str) and rec[key].strip():
                cap = rec[key].strip()
                break
        if cap is None and isinstance(rec.get("conversations"), list):
            for turn in rec["conversations"]:
                if isinstance(turn, dict) and turn.get("from") == "gpt" and \
                        isinstance(turn.get("value"), str):
                    cap = turn["value"].strip()
                    break
        if not cap:
            raise DataError("no caption: expected a non-empty 'caption', 'blip_caption' or a "
                            "'gpt' turn in 'conversations'", path, i, "caption")
        out.append(CaptionSample(image, prompt, cap, str(path), i, "image"))
    return out


def load_qa(path: str | Path, image_root: str | Path) -> list[CaptionSample]:
    """Read a JSON list of ``{image, question, answer}`` into samples (question = prompt)."""
    path = Path(path)
    out = []
    for i, rec in enumerate(_read_json_list(path), start=1):
        if not isinstance(rec, dict):
            raise DataError(f"expected an object, got {type(rec).__name__}", path, i)
        for key in ("image", "question", "answer"):
            if not isinstance(rec.get(key), str) or not rec[key]:
                raise DataError(f"missing or empty {key!r}", path, i, key)
        image = resolve_under(image_root, rec["image"], source=path, line=i, field="image")
        out.append(CaptionSample(image, rec["question"], rec["answer"], str(path), i, "image"))
    return out


def build_generative_batch(adapter: BackboneAdapter, samples: list[CaptionSample],
                           ) -> tuple[EncodedBatch, torch.Tensor]:
    """Tokenise ``<image> prompt target<eos>`` with labels on the target and the EOS only."""
    items = []
    for s in samples:
        head = f"{IMAGE_PLACEHOLDER}\n{s.prompt} "
        text = head + s.target
        items.append(MMItem(text, s.image, content=(len(head), len(text)), source=s.source,
                            line=s.line, field=s.field))
    batch = adapter.encode(items)
    ids = batch.inputs["input_ids"]
    keep = batch.text_mask.clone()
    keep[torch.arange(ids.shape[0]), batch.eos_index] = True
    labels = torch.where(keep, ids, torch.full_like(ids, -100))
    return batch, labels


class GenerativeModule(nn.Module):
    """Next-token loss of the full generative model on (prompt → target) samples."""

    def __init__(self, adapter: BackboneAdapter):
        super().__init__()
        self.adapter = adapter  # a module: registers the model's parameters

    def forward(self, batch: tuple[EncodedBatch, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        enc, labels = batch
        return {"loss": self.adapter.generative_loss(enc, labels)}


@torch.no_grad()
def generative_eval_loss(adapter: BackboneAdapter, samples: list[CaptionSample],
                         batch_size: int = 32) -> float:
    """Mean next-token loss (nats/token) on held-out samples: lower = better language model."""
    model = adapter.model
    was = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        for i in range(0, len(samples), batch_size):
            enc, labels = build_generative_batch(adapter, samples[i:i + batch_size])
            enc = enc.to(adapter.device)
            labels = labels.to(adapter.device)
            loss = adapter.generative_loss(enc, labels)
            ntok = int((labels[:, 1:] != -100).sum())
            total += float(loss) * ntok
            n += ntok
    finally:
        model.train(was)
    return total / max(n, 1)


def run_stage0(cfg: Stage0Config) -> Path:
    """Train the generative model and save it to ``<out_dir>/model``; returns that path."""
    out = Path(cfg.run.out_dir)
    final = out / "model"
    if (final / "config.json").exists() and cfg.run.resume:
        log.info("stage 0: %s already holds a trained model; skipping", final)
        return final
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    adapter = load_backbone(cfg.model, max_text_tokens=cfg.max_text_tokens)
    root = cfg.image_root or str(Path(cfg.captions).parent)
    samples = load_captions(cfg.captions, root, cfg.prompt)
    if cfg.qa:
        samples += load_qa(cfg.qa, root)
    log.info("stage 0: %d samples from %s", len(samples), cfg.captions)
    for p in adapter.model.parameters():
        p.requires_grad_(True)
    module = GenerativeModule(adapter)
    trainer = Trainer(module, samples, lambda ex: build_generative_batch(adapter, ex), cfg.optim,
                      cfg.run, "stage0",
                      to_device=lambda b, d: (b[0].to(d), b[1].to(d)),
                      config_dump=to_dict(cfg))
    trainer.train()
    adapter.model.eval()
    adapter.save_pretrained(final)
    log.info("stage 0: saved the generative model to %s", final)
    return final
