"""Patch-aligned projector training (method.md §4; arXiv 2505.17316).

LLaVA-style pre-training of the vision-language projector ``P`` with the vision tower and
the LLM **frozen**:

    L = L_caption + β(t) · L_patch,   β: 0 → β_max (= 5) linearly over the stage

``L_caption`` is the next-token loss of ``<image> prompt caption<eos>`` (labels on the
caption and the EOS only, as :func:`fam.train.stage0.build_generative_batch`). ``L_patch``
(:func:`fam.losses.patch.patch_alignment_loss`) pulls the projected tokens of each annotated
region of the image (PAD record, method.md §4) towards the mean LLM input embedding of the
region's label tokens. ``β_max = 0`` is the caption-only baseline (LLaVA's own projector
pre-training) and gives exactly its gradients.

Per sample (all precomputed once, on the CPU, when the data set is built):

1. the PAD masks go through exactly the image processor's geometry
   (:func:`fam.projector.geometry.processor_transform`), are average-pooled onto the patch grid
   (coverage ``c_k``) and thresholded at θ (``S_k``, arg-max fallback);
2. the label is tokenised as written mid-sentence (:func:`fam.projector.regions.label_token_ids`).

At each step one forward of the full model gives the caption loss, and a forward hook on
``multi_modal_projector`` (:class:`fam.projector.hooks.ProjectorTap`) gives the projected
tokens ``P(X)`` (B, N, d) in raster order — the exact tensors scattered into the ``<image>``
positions of the LLM input — on which the patch loss is computed.

Projector types:

* ``"mlp"`` — LLaVA-1.5's 2-layer MLP with GELU (``LlavaMultiModalProjector``).
* ``"linear"`` — a single ``Linear(d_v → d)``. It is stored **inside the stock LLaVA class**
  so the checkpoint loads back with plain ``LlavaForConditionalGeneration.from_pretrained``
  (and :func:`fam.backbones.load_backbone`) with no custom code:
  ``config.projector_hidden_act = "linear"`` (identity activation), ``linear_1`` is the
  trainable map and ``linear_2`` is frozen at the identity with zero bias, so
  ``P(x) = I·(W x + b) + 0 = W x + b`` exactly. :func:`is_linear_projector` recognises it.
  (Replacing the module by a bare ``nn.Linear`` would save keys that the LLaVA class
  cannot load: they would be silently re-initialised.)

The trained model is saved as a normal checkpoint directory ``<out>/model``; the stage runs
through :func:`fam.train.runner.run_stage` like every other (resumable; only the
projector's parameters are in its checkpoints).

Example:
    >>> cfg = load_config(ProjectorConfig, None, ["model=runs/stage0/model",
    ...     "captions=data/captions.json", "pad=data/pad.jsonl", "run.out_dir=runs/proj"])
    >>> run_projector(cfg)  # doctest: +SKIP
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fam.backbones import load_backbone
from fam.backbones.base import BackboneAdapter, EncodedBatch
from fam.config import ProjectorConfig
from fam.config.stages import PROJECTOR_TYPES
from fam.data.captions import CaptionSample, load_captions
from fam.errors import ConfigError, DataError
from fam.losses.patch import beta_schedule, label_embedding, patch_alignment_loss, projector_loss
from fam.pad.records import iter_pad
from fam.projector.hooks import ProjectorTap, projector_module
from fam.projector.regions import RegionTargets, region_targets, token_layout
from fam.train.stage0 import build_generative_batch
from fam.train.runner import Recipe, StageParts, run_stage
from fam.train.trainer import TrainResult
from fam.utils.io import atomic_write_json

log = logging.getLogger(__name__)



# ----------------------------------------------------------------------------- projector


def is_linear_projector(proj: nn.Module) -> bool:
    """Whether a ``LlavaMultiModalProjector`` is the linear form (identity act, identity
    ``linear_2`` with zero bias) written by :func:`setup_projector`."""
    l2 = getattr(proj, "linear_2", None)
    act = getattr(proj, "act", None)
    if l2 is None or act is None or l2.weight.shape[0] != l2.weight.shape[1]:
        return False
    from transformers.activations import LinearActivation
    eye = torch.eye(l2.weight.shape[0], dtype=l2.weight.dtype, device=l2.weight.device)
    zero_b = l2.bias is None or bool((l2.bias == 0).all())
    return isinstance(act, LinearActivation) and bool(torch.equal(l2.weight.detach(), eye)) \
        and zero_b


def setup_projector(adapter: BackboneAdapter, kind: str = "mlp", reinit: bool = True,
                    seed: int = 0) -> nn.Module:
    """Freeze the whole model, (re)build the projector and make only it trainable.

    Args:
        adapter: a LLaVA-style adapter; modified in place (its model's projector and config).
        kind: "mlp" (``Linear → GELU → Linear``) or "linear" (a single effective Linear,
            stored in the LLaVA class as described in the module docstring).
        reinit: build a fresh projector (PyTorch default init, seeded by ``seed``); if False
            keep the checkpoint's projector, which must already be of type ``kind``.
        seed: seed of the fresh projector's initialisation (drawn from a private generator
            state, so the global RNG stream is left as it was).

    Returns:
        The projector module (its trainable parameters: both MLP layers, or ``linear_1``).
    """
    if kind not in PROJECTOR_TYPES:
        raise ConfigError(f"projector type {kind!r}: expected one of {PROJECTOR_TYPES}")
    hf = adapter.hf_model
    old = projector_module(hf)
    for p in adapter.model.parameters():
        p.requires_grad_(False)
    cfg = hf.config
    if reinit:
        cfg.projector_hidden_act = "linear" if kind == "linear" else "gelu"
        ref = next(old.parameters())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            new = type(old)(cfg)
        new.to(device=ref.device, dtype=ref.dtype)
        owner = hf.model if getattr(hf.model, "multi_modal_projector", None) is old else hf
        owner.multi_modal_projector = new
        proj = new
        if kind == "linear":
            with torch.no_grad():
                proj.linear_2.weight.copy_(torch.eye(proj.linear_2.weight.shape[0]))
                if proj.linear_2.bias is not None:
                    proj.linear_2.bias.zero_()
    else:
        proj = old
        if kind == "linear" and not is_linear_projector(proj):
            raise ConfigError("reinit=false with projector=linear: the checkpoint's projector "
                              "is not the linear form; set reinit=true to start a fresh one")
        if kind == "mlp" and is_linear_projector(proj):
            raise ConfigError("reinit=false with projector=mlp: the checkpoint holds a linear "
                              "projector; set projector=linear or reinit=true")
    proj.requires_grad_(False)
    if kind == "linear":
        proj.linear_1.requires_grad_(True)     # linear_2 stays the frozen identity
    else:
        proj.requires_grad_(True)
    n = sum(p.numel() for p in proj.parameters() if p.requires_grad)
    log.info("projector: %s (%s), %d trainable parameters; vision tower and LLM frozen",
             kind, "fresh" if reinit else "from the checkpoint", n)
    return proj


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ProjectorSample:
    """One training example: an image with its caption and its regions on the token grid."""

    caption: CaptionSample
    regions: RegionTargets


@dataclass
class ProjectorBatch:
    """A collated batch.

    Attributes:
        enc: the tokenised ``<image> prompt caption<eos>`` batch.
        labels: ``(B, L)`` next-token labels (-100 off the caption).
        patch_sets: ``(K, N)`` bool ``S_k`` of all regions of the batch.
        coverage: ``(K, N)`` float coverage ``c_k``.
        image_index: ``(K,)`` long, the batch row of each region.
        label_ids: K lists of label token ids.
    """

    enc: EncodedBatch
    labels: torch.Tensor
    patch_sets: torch.Tensor
    coverage: torch.Tensor
    image_index: torch.Tensor
    label_ids: list[list[int]]

    def to(self, device: torch.device | str) -> "ProjectorBatch":
        return ProjectorBatch(self.enc.to(device), self.labels.to(device),
                              self.patch_sets.to(device), self.coverage.to(device),
                              self.image_index.to(device), self.label_ids)


def build_projector_samples(adapter: BackboneAdapter, captions: str | Path,
                            pad: str | Path | None, image_root: str | Path,
                            prompt: str = "Describe the image.", theta: float = 0.5,
                            ) -> list[ProjectorSample]:
    """Join caption records with PAD records (by image path) into training samples.

    Images without a PAD record keep an empty region set (caption loss only).

    Raises:
        DataError: a PAD record's size disagrees with its masks, or its image escapes
            ``image_root`` (names file and line).
    """
    caps = load_captions(captions, image_root, prompt)
    regions: dict[Path, RegionTargets] = {}
    n_rec = 0
    wanted = {c.image for c in caps}
    if pad:
        for rec in iter_pad(pad, image_root):
            n_rec += 1
            if rec.path in wanted:  # e.g. skip the evaluation images of a shared PAD file
                regions[rec.path] = region_targets(rec, adapter, theta)
    gh, gw, off = token_layout(adapter)
    n = off + gh * gw
    empty = RegionTargets([], [], np.zeros((0, n), bool), np.zeros((0, n), np.float32),
                          (gh, gw), off)
    out = []
    n_with = 0
    for c in caps:
        r = regions.get(c.image)
        if r is None:
            r = empty
        else:
            n_with += 1
        out.append(ProjectorSample(c, r))
    n_reg = sum(len(s.regions) for s in out)
    log.info("projector data: %d captions, %d with PAD regions (%d regions; %d PAD records read)",
             len(out), n_with, n_reg, n_rec)
    if pad and n_with == 0:
        raise DataError("no caption image has a PAD record: check that both files use the "
                        "same image paths relative to image_root", pad)
    return out


def collate_projector(adapter: BackboneAdapter, samples: list[ProjectorSample]) -> ProjectorBatch:
    """Tokenise the captions (images loaded and processed) and stack the region targets."""
    enc, labels = build_generative_batch(adapter, [s.caption for s in samples])
    sets = [s.regions.patch_sets for s in samples]
    covs = [s.regions.coverage for s in samples]
    n_tok = int(enc.image_mask[0].sum())
    for s, st in zip(samples, sets):
        if st.shape[0] and st.shape[1] != n_tok:
            raise DataError(f"region targets have {st.shape[1]} token columns but the image "
                            f"gave {n_tok} image tokens", s.caption.source, s.caption.line)
    idx = [i for i, s in enumerate(samples) for _ in range(len(s.regions))]
    return ProjectorBatch(
        enc, labels,
        torch.from_numpy(np.concatenate(sets)) if idx else torch.zeros(0, n_tok, dtype=torch.bool),
        torch.from_numpy(np.concatenate(covs)) if idx else torch.zeros(0, n_tok),
        torch.tensor(idx, dtype=torch.long),
        [ids for s in samples for ids in s.regions.token_ids])


# ----------------------------------------------------------------------------- module


class ProjectorModule(nn.Module):
    """The LLaVA-style model with its projector tapped; ``forward`` → named outputs.

    ``caption`` (the next-token loss of the batch), ``tokens`` (B, N, d) — the projected
    tokens ``P(X)`` in raster order, exactly what the LLM reads — and ``labels`` (K, d), the
    frozen label embeddings ``t_k`` of the batch's regions.

    Args:
        adapter: the backbone (projector already set up by :func:`setup_projector`).
    """

    def __init__(self, adapter: BackboneAdapter):
        super().__init__()
        self.adapter = adapter  # a module: registers the model's parameters

    def forward(self, batch: ProjectorBatch, step: int = 0) -> dict[str, torch.Tensor]:
        with ProjectorTap(projector_module(self.adapter.model)) as tap:
            caption = self.adapter.generative_loss(batch.enc, batch.labels)
        tokens = tap.output                                    # (B, N, d), raster order
        if batch.label_ids:
            labels = label_embedding(batch.label_ids, self.adapter.input_embeddings().weight)
        else:
            labels = tokens.new_zeros(0, tokens.shape[-1])      # (K, d), frozen
        return {"caption": caption, "tokens": tokens, "labels": labels}


@dataclass
class PatchAlignedLoss:
    """``L = L_caption + β(step) · L_patch`` (method.md §4) over :class:`ProjectorModule`'s outputs.

    While ``β == 0`` the patch loss is computed on detached tokens for logging only, so the
    gradients are exactly the caption-only ones.

    Args:
        total_steps: steps of the stage (the default β ramp length).
        beta_max: final β; 0 is the caption-only baseline.
        ramp_steps: β ramp length; 0 = ``total_steps``.
        pooling: region pooling of the patch loss.
    """

    total_steps: int
    beta_max: float = 5.0
    ramp_steps: int = 0
    pooling: str = "mean"

    def beta(self, step: int) -> float:
        if self.beta_max == 0:
            return 0.0
        return beta_schedule(step, self.total_steps, self.beta_max, self.ramp_steps or None)

    def __call__(self, caption, tokens, labels, *, batch: ProjectorBatch, step: int,
                 ) -> dict[str, torch.Tensor]:
        beta = self.beta(step)
        dev = tokens.device
        patch = patch_alignment_loss(tokens if beta > 0 else tokens.detach(),
                                     batch.patch_sets.to(dev), labels.to(tokens.dtype),
                                     batch.image_index.to(dev), pooling=self.pooling,
                                     coverage=batch.coverage.to(dev))
        loss = projector_loss(caption, patch["loss"], beta)
        return {"loss": loss, "caption": caption.detach(), "patch": patch["loss"].detach(),
                "patch_cos": patch["mean_cos"], "beta": torch.tensor(beta)}


# ----------------------------------------------------------------------------- the stage


class ProjectorRecipe(Recipe):
    """A fresh projector between frozen towers, trained with caption + β·patch loss."""

    cfg: ProjectorConfig
    name = "projector"

    def module(self) -> ProjectorModule:
        cfg = self.cfg
        adapter = load_backbone(cfg.model, max_text_tokens=cfg.max_text_tokens,
                                **cfg.backbone.load_options())
        setup_projector(adapter, cfg.projector, cfg.reinit, cfg.run.seed)
        return ProjectorModule(adapter)

    def build(self) -> StageParts:
        cfg = self.cfg
        module = self.module()
        adapter = module.adapter
        samples = build_projector_samples(adapter, cfg.captions, cfg.pad or None,
                                          cfg.image_root or str(Path(cfg.captions).parent),
                                          cfg.prompt, cfg.theta)
        loss = PatchAlignedLoss(cfg.optim.steps, cfg.beta_max, cfg.ramp_steps, cfg.pooling)
        return StageParts(module, loss, samples, lambda ex: collate_projector(adapter, ex),
                          to_device=lambda b, d: b.to(d))

    def export(self, module: ProjectorModule, final: Path, result: TrainResult) -> None:
        cfg = self.cfg
        module.adapter.model.eval()
        module.adapter.save_pretrained(final)
        atomic_write_json(final.parent / "projector.json", {
            "type": cfg.projector, "beta_max": cfg.beta_max, "ramp_steps": cfg.ramp_steps,
            "theta": cfg.theta, "pooling": cfg.pooling, "steps": result.steps,
            "final_metrics": result.final_metrics})


def run_projector(cfg: ProjectorConfig) -> Path:
    """Train the projector and save the whole model to ``<run.out_dir>/model``.

    Skips the work when that directory already holds a model and ``run.resume`` is set;
    an interrupted run continues from its last checkpoint.

    Returns:
        The saved checkpoint directory.
    """
    return run_stage(cfg)


__all__ = ["PROJECTOR_TYPES", "ProjectorBatch", "ProjectorConfig", "ProjectorModule",
           "PatchAlignedLoss", "ProjectorRecipe", "ProjectorSample", "build_projector_samples",
           "collate_projector", "is_linear_projector", "run_projector", "setup_projector"]
