"""The alignment report of a LLaVA-style checkpoint: compression, Align(V, W), matching pursuit.

:func:`analyze_alignment` runs every SPEC §5 analysis of arXiv 2505.17316 on the images of a
Patch-Aligned Dataset (PAD, SPEC §4) file and writes ``alignment.json`` plus figures:

* **Compression.** Matrix entropy (:mod:`fam.analysis.entropy`) of each image's vision
  tokens *before* the projector (the vision-tower features exactly as fed to
  ``multi_modal_projector``) and *after* it (the projected tokens the LLM reads), ``ΔH``,
  and the text reference: the entropy of caption tokens' LLM input embeddings.
* **Align(V, W)** (:mod:`fam.analysis.alignment`): patch-level mIoU of each region's
  similarity map with its ground-truth patch set ``S_k``, mean in-mask cosine and
  in-minus-out contrast, with label embeddings ``t_k`` = mean input embedding of the label's
  tokens.
* **Region → phrase retrieval.** Each region's mean projected token ``z_k`` ranked by cosine
  against the label embeddings of every distinct label of the PAD file; top-1 accuracy
  (a downstream read-out of patch-level alignment; chance = 1 / #labels).
* **Matching pursuit** (:mod:`fam.analysis.matching_pursuit`) of projected patches over the
  LLM vocabulary (dictionary = input-embedding matrix without special tokens): explained
  energy vs K, atoms needed per patch, and label recovery (do a region's label tokens appear
  among the top-K atoms of its in-mask patches?).

The module also holds the small pieces that patch-aligned training shares with the report:
the image processor's geometry (:func:`processor_transform`), the PAD reader
(:func:`read_pad_records`), region targets on the token grid (:func:`region_targets`),
label tokenisation (:func:`label_token_ids`) and a forward hook on the projector
(:class:`ProjectorTap`).

Token order. LLaVA's vision tower flattens its conv patch grid row by row and the model
scatters the projected tokens into the ``<image>`` positions in sequence order, so the
``n``-th image token is grid cell ``(n // G_w, n % G_w)`` (raster order), after the CLS token
when ``vision_feature_select_strategy == "full"`` (handled by a column offset).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fam.analysis.alignment import alignment_report, patch_ious, similarity_map
from fam.analysis.entropy import matrix_entropy
from fam.analysis.geometry import (RESAMPLE, ImageTransform, _shortest_edge_size,
                                   clip_transform, mask_to_patch_coverage, select_patches,
                                   transform_image)
from fam.analysis.matching_pursuit import matching_pursuit
from fam.data.images import load_image
from fam.data.rle import rle_decode
from fam.errors import ConfigError, DataError
from fam.losses.patch import region_embeddings
from fam.utils.io import atomic_write_json, atomic_write_text, read_jsonl, resolve_under

logger = logging.getLogger(__name__)

__all__ = ["ProjectorTap", "RegionTargets", "analyze_alignment", "label_token_ids",
           "processor_transform", "projector_module", "read_pad_records", "region_targets",
           "jsonable", "token_layout", "vision_tokens"]


# ----------------------------------------------------------------------------- model access


def projector_module(model: torch.nn.Module) -> torch.nn.Module:
    """The ``multi_modal_projector`` of a LLaVA-style model (peft wrappers are unwrapped).

    Raises:
        ConfigError: the model has no ``multi_modal_projector`` (e.g. Qwen2-VL, whose
            merger sits inside the vision tower).
    """
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    for owner in (getattr(m, "model", None), m):
        proj = getattr(owner, "multi_modal_projector", None) if owner is not None else None
        if proj is not None:
            return proj
    mt = getattr(getattr(m, "config", None), "model_type", type(m).__name__)
    raise ConfigError(f"model_type {mt!r} has no multi_modal_projector: projector training "
                      "and the alignment report need a LLaVA-style checkpoint "
                      "(vision tower → multi_modal_projector → LLM)")


class ProjectorTap:
    """Context manager recording the input and output of every call of a module.

    Used on ``multi_modal_projector``: its input is the vision-tower features as fed to the
    projector ``(B, N, d_v)``, its output the projected tokens ``(B, N, d)`` in raster order
    (see the module docstring). The recorded tensors keep their autograd graph.

    Example:
        >>> with ProjectorTap(projector_module(model)) as tap:
        ...     loss = adapter.generative_loss(batch, labels)
        >>> tokens = tap.output          # (B, N, d)
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self._handle: Any = None

    def _hook(self, mod: torch.nn.Module, args: tuple[Any, ...], out: Any) -> None:
        self.inputs.append(args[0] if args else None)
        self.outputs.append(out)

    def __enter__(self) -> "ProjectorTap":
        self.inputs.clear()
        self.outputs.clear()
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> bool:
        self._handle.remove()
        return False

    def _one(self, seq: list[torch.Tensor], what: str) -> torch.Tensor:
        if len(seq) != 1:
            raise RuntimeError(f"ProjectorTap: the projector ran {len(seq)} times in the "
                               f"block, expected exactly once to read its {what}")
        return seq[0]

    @property
    def input(self) -> torch.Tensor:
        """``(B, N, d_v)`` features fed to the projector in the single recorded call."""
        return self._one(self.inputs, "input")

    @property
    def output(self) -> torch.Tensor:
        """``(B, N, d)`` projected tokens of the single recorded call."""
        return self._one(self.outputs, "output")


@torch.no_grad()
def vision_tokens(adapter: Any, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """Vision tokens of images before and after the projector (vision tower + projector only).

    Args:
        adapter: a LLaVA-style backbone adapter.
        images: PIL images.

    Returns:
        ``(before, after)``: ``(B, N, d_v)`` projector inputs and ``(B, N, d)`` projector
        outputs, float32 on the CPU, raster token order.
    """
    pix, _ = adapter.process_images(list(images))
    pv = pix["pixel_values"].to(adapter.device, adapter.dtype)
    hf = adapter.hf_model
    with ProjectorTap(projector_module(hf)) as tap:
        hf.model.get_image_features(pixel_values=pv)
    return tap.input.float().cpu(), tap.output.float().cpu()


# ----------------------------------------------------------------------------- geometry

_RESAMPLE_NAMES = {int(v): k for k, v in RESAMPLE.items()}


def processor_transform(image_processor: Any, orig_size: tuple[int, int],
                        patch_size: int) -> ImageTransform:
    """The geometric transform a CLIP-style image processor applies to one image.

    Reads ``size`` (``shortest_edge`` or ``height``/``width``), ``do_center_crop`` /
    ``crop_size``, ``do_pad`` (LLaVA's pad-to-square) and ``resample`` from the processor, so
    masks go through exactly what the pixels go through (SPEC §4).

    Args:
        image_processor: e.g. ``CLIPImageProcessorPil`` (LLaVA-1.5).
        orig_size: ``(H, W)`` of the original image.
        patch_size: vision-tower patch side (``config.vision_config.patch_size``).

    Raises:
        ConfigError: a processor geometry this function does not model.
    """
    size = dict(getattr(image_processor, "size", None) or {})
    resample = _RESAMPLE_NAMES.get(int(getattr(image_processor, "resample", 3)), "bicubic")
    do_crop = bool(getattr(image_processor, "do_center_crop", False))
    crop = dict(getattr(image_processor, "crop_size", None) or {}) if do_crop else {}
    do_resize = bool(getattr(image_processor, "do_resize", True))
    pad_sq = bool(getattr(image_processor, "do_pad", False))
    h, w = orig_size
    if not do_resize:
        resized = (h, w)
    elif "shortest_edge" in size:
        if do_crop and crop.get("height") == crop.get("width"):
            return clip_transform(orig_size, size=int(size["shortest_edge"]),
                                  crop_size=int(crop["height"]), patch_size=patch_size,
                                  pad_to_square=pad_sq, resample=resample)
        if pad_sq:
            raise ConfigError("processor_transform: do_pad with a non-square crop is not "
                              "modelled; use a square crop_size")
        resized = _shortest_edge_size(h, w, int(size["shortest_edge"]))
    elif "height" in size and "width" in size:
        if pad_sq:
            raise ConfigError("processor_transform: do_pad with a fixed (height, width) "
                              "resize is not modelled")
        resized = (int(size["height"]), int(size["width"]))
    else:
        raise ConfigError(f"processor_transform: unsupported processor size {size!r}; "
                          "expected {'shortest_edge': n} or {'height': h, 'width': w}")
    crop_box = None
    if do_crop:
        ch, cw = int(crop["height"]), int(crop["width"])
        if resized != (ch, cw):
            crop_box = ((resized[0] - ch) // 2, (resized[1] - cw) // 2, ch, cw)
    return ImageTransform(orig_size=(h, w), resized_size=resized, crop_box=crop_box,
                          patch_size=patch_size, merge_size=1, resample=resample)


def token_layout(adapter: Any) -> tuple[int, int, int]:
    """``(G_h, G_w, offset)`` of a LLaVA adapter's image tokens.

    ``offset`` is 1 when the CLS token leads the image tokens
    (``vision_feature_select_strategy == "full"``), else 0: grid cell ``i`` (raster) is image
    token ``offset + i``.
    """
    if not hasattr(adapter, "patch_grid"):
        raise ConfigError(f"{type(adapter).__name__} has no patch_grid(): the alignment tools "
                          "need a LLaVA-style adapter")
    gh, gw = adapter.patch_grid()
    full = getattr(adapter.config, "vision_feature_select_strategy", "default") == "full"
    return gh, gw, int(full)


# ----------------------------------------------------------------------------- PAD data


def read_pad_records(path: str | Path, select: str | None = None) -> list[tuple[int, dict]]:
    """Read a PAD JSONL file (SPEC §4) into ``(line, record)`` pairs, validating fields.

    Args:
        path: ``pad.jsonl``; one ``{image, width, height, tags, regions: [{label, score,
            box, mask}]}`` per line.
        select: keep only records whose ``image`` contains this substring (e.g.
            ``"images/eval/"`` for the Scenes evaluation images).

    Raises:
        DataError: a record lacks ``image``/``width``/``height``/``regions`` or a region
            lacks ``label``/``mask`` (names the file, line and field).
    """
    out = []
    for line, rec in read_jsonl(path):
        for key, tp in (("image", str), ("width", int), ("height", int), ("regions", list)):
            if not isinstance(rec.get(key), tp):
                raise DataError(f"PAD record needs {key!r} of type {tp.__name__}", path, line,
                                key)
        for j, reg in enumerate(rec["regions"]):
            if not isinstance(reg, dict) or not isinstance(reg.get("label"), str) or \
                    not isinstance(reg.get("mask"), dict):
                raise DataError(f"region {j} needs a string 'label' and a COCO RLE 'mask'",
                                path, line, f"regions[{j}]")
        if select is None or select in rec["image"]:
            out.append((line, rec))
    return out


def label_token_ids(tokenizer: Any, label: str, context: str = "a") -> list[int]:
    """Token ids of a label as it is written inside a sentence (no special tokens).

    The label is tokenised after a context word (``"a red circle"``) and the tokens
    overlapping the label's characters are kept. With byte-level BPE, a word at the start of
    a string tokenises differently from the same word mid-sentence (``"red"`` → ``re``,
    ``d`` but ``" red"`` → ``Ġred``), and only the mid-sentence form is what captions train;
    SentencePiece tokenizers give ``▁red`` either way.

    Args:
        tokenizer: a fast tokenizer (offset mapping needed).
        label: the region label, e.g. ``"fire hydrant"``.
        context: the word written before it.

    Returns:
        The label's token ids (may be empty for an empty label).
    """
    label = label.strip()
    if not label:
        return []
    text = f"{context} {label}"
    start = len(context) + 1
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    special = set(int(i) for i in getattr(tokenizer, "all_special_ids", []))
    ids = [int(t) for t, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])
           if e > start and s < len(text) and e > s and int(t) not in special]
    if not ids:  # a tokenizer without offsets for these pieces: plain tokenisation
        ids = [int(t) for t in tokenizer(label, add_special_tokens=False)["input_ids"]
               if int(t) not in special]
    return ids


@dataclass
class RegionTargets:
    """The annotated regions of one image on the LLM's image-token grid (SPEC §4).

    Attributes:
        labels: K region labels.
        token_ids: K lists, each label's token ids (:func:`label_token_ids`).
        patch_sets: ``(K, N)`` bool ``S_k`` over the N image tokens (raster, after the CLS
            offset when there is one).
        coverage: ``(K, N)`` float32 patch coverage ``c_k``.
        grid: ``(G_h, G_w)``.
        offset: index of grid cell 0 among the image tokens (1 with a leading CLS token).
    """

    labels: list[str]
    token_ids: list[list[int]]
    patch_sets: np.ndarray
    coverage: np.ndarray
    grid: tuple[int, int]
    offset: int = 0

    def __len__(self) -> int:
        return len(self.labels)


def region_targets(record: dict, adapter: Any, theta: float = 0.5, *,
                   where: tuple[str | Path, int] | None = None) -> RegionTargets:
    """Decode a PAD record's masks into patch sets on the adapter's image-token grid.

    Each mask goes through the image processor's exact geometry
    (:func:`processor_transform`), is average-pooled onto the patch grid (``c_k``) and
    thresholded at ``theta`` with the arg-max fallback (``S_k``; SPEC §4). Regions cropped
    away entirely (empty ``S_k``) and labels without tokens are dropped.

    Args:
        record: a PAD record (see :func:`read_pad_records`).
        adapter: a LLaVA-style adapter (processor, tokenizer, patch grid).
        theta: coverage threshold (0.5 in the paper).
        where: ``(file, line)`` of the record for error messages.

    Returns:
        :class:`RegionTargets` with ``N = offset + G_h·G_w`` columns.
    """
    src, line = where if where is not None else (None, None)
    gh, gw, off = token_layout(adapter)
    h, w = int(record["height"]), int(record["width"])
    patch = int(adapter.config.vision_config.patch_size)
    tf = processor_transform(adapter.image_processor, (h, w), patch)
    if tf.grid_size("token") != (gh, gw):
        raise DataError(f"processed grid {tf.grid_size('token')} != the model's patch grid "
                        f"{(gh, gw)}; the processor and the vision config disagree", src, line)
    labels, ids, masks = [], [], []
    for j, reg in enumerate(record["regions"]):
        m = rle_decode(reg["mask"], where=str(src) if src else None)
        if m.shape != (h, w):
            raise DataError(f"region {j} mask is {m.shape[0]}x{m.shape[1]} but the record says "
                            f"{h}x{w} (height x width); masks must be at full resolution",
                            src, line, f"regions[{j}].mask")
        tok = label_token_ids(adapter.tokenizer, reg["label"])
        if not tok:
            logger.debug("%s:%s region %d: label %r has no tokens; skipped", src, line, j,
                         reg["label"])
            continue
        labels.append(reg["label"])
        ids.append(tok)
        masks.append(m)
    n = off + gh * gw
    if not masks:
        return RegionTargets([], [], np.zeros((0, n), bool), np.zeros((0, n), np.float32),
                             (gh, gw), off)
    cov = mask_to_patch_coverage(np.stack(masks), tf, level="token").reshape(len(masks), -1)
    sets = select_patches(cov, theta, flat=True)
    keep = sets.any(axis=1)
    if not keep.all():
        logger.debug("%s:%s: %d region(s) outside the processed image; skipped", src, line,
                     int((~keep).sum()))
    cov, sets = cov[keep], sets[keep]
    labels = [x for x, k in zip(labels, keep) if k]
    ids = [x for x, k in zip(ids, keep) if k]
    if off:
        cov = np.concatenate([np.zeros((len(cov), off), np.float32), cov], axis=1)
        sets = np.concatenate([np.zeros((len(sets), off), bool), sets], axis=1)
    return RegionTargets(labels, ids, sets, cov.astype(np.float32), (gh, gw), off)


# ----------------------------------------------------------------------------- the report


def _load_adapter(model: Any) -> Any:
    if isinstance(model, (str, Path)):
        from fam.backbones import load_backbone
        return load_backbone(model)
    return model


def _caption_map(captions: str | Path | None) -> dict[str, str]:
    if not captions:
        return {}
    import json
    recs = json.loads(Path(captions).read_text(encoding="utf-8"))
    out = {}
    for r in recs:
        if isinstance(r, dict) and isinstance(r.get("image"), str):
            cap = r.get("caption") or r.get("blip_caption")
            if isinstance(cap, str) and cap.strip():
                out[r["image"]] = cap.strip()
    return out


def _decode(tokenizer: Any, token_id: int) -> str:
    """A token as text; byte-level pieces that are not valid UTF-8 alone show their raw
    vocabulary string instead of U+FFFD."""
    s = tokenizer.decode([token_id])
    if "\ufffd" in s:
        s = str(tokenizer.convert_ids_to_tokens(token_id))
    return s


def _chance_hit(vocab: int, n_label: int, k: int) -> float:
    """P(at least one of ``n_label`` tokens among ``k`` distinct uniformly drawn atoms)."""
    if n_label <= 0 or vocab <= 0:
        return float("nan")
    miss = 1.0
    for j in range(min(k, vocab)):
        miss *= max(0.0, (vocab - n_label - j) / (vocab - j))
    return 1.0 - miss


def _atoms_to_reach(energy: torch.Tensor, thr: float) -> tuple[float, float]:
    """Mean number of atoms to reach ``thr`` explained energy (unreached count as K+1), and
    the fraction of vectors that reach it within K. ``energy``: ``(M, K+1)``."""
    k = energy.shape[1] - 1
    reached = energy >= thr
    first = torch.where(reached.any(1), reached.float().argmax(1),
                        torch.full((energy.shape[0],), k + 1))
    return float(first.float().mean()), float(reached.any(1).float().mean())


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def analyze_alignment(model: str | Path | Any, pad_path: str | Path, image_root: str | Path,
                      out_dir: str | Path, *, max_images: int = 32, k_max: int = 10,
                      theta: float = 0.5, select: str | None = None,
                      captions: str | Path | None = None, batch_size: int = 16,
                      n_heatmaps: int = 3, n_atom_rows: int = 24, plots: bool = True,
                      name: str | None = None) -> dict[str, Any]:
    """Run the SPEC §5 analyses of a LLaVA-style checkpoint on PAD images; write a report.

    Args:
        model: checkpoint directory (or an already loaded LLaVA adapter).
        pad_path: PAD JSONL (SPEC §4); image paths relative to ``image_root``.
        image_root: folder the records' image paths are relative to.
        out_dir: where ``alignment.json``, ``atoms.md`` and the PNGs go.
        max_images: analyse the first ``max_images`` selected records (file order).
        k_max: matching-pursuit steps K (paper: 5–10).
        theta: coverage threshold of ``S_k``.
        select: keep records whose image path contains this substring (e.g.
            ``"images/eval/"``).
        captions: optional LLaVA caption JSON (``[{image, caption}]``) for the text entropy
            reference; without it a record's ``caption`` field is used, else its region
            labels joined into a sentence.
        batch_size: images per vision-tower forward.
        n_heatmaps: images drawn as similarity heatmaps.
        n_atom_rows: sample patches listed in ``atoms.md``.
        plots: write the PNG figures (needs matplotlib).
        name: model name used in figure legends (default: the directory name).

    Returns:
        The content of ``alignment.json``: ``entropy`` (``H_before``, ``H_after``,
        ``delta_H``, ``H_text``), ``align`` (``miou``, ``in_mask_cos``, ``out_mask_cos``,
        ``contrast``, ``n_regions``), ``retrieval`` (``top1``, ``top5``, ``n_candidates``,
        ``chance``), ``matching_pursuit`` (``explained_energy`` (K+1 means),
        ``atoms_to_50`` / ``atoms_to_80`` (mean atoms to reach 50/80% energy, unreached
        counted as K+1), ``recovery`` (region- and patch-level label recovery at K=1, 5,
        K_max, with chance levels)), ``counts`` and ``files``. Primary metric:
        ``align.miou``.
    """
    adapter = _load_adapter(model)
    projector_module(adapter.model)  # fail early, with a clear message, on non-LLaVA models
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = name or (Path(model).name if isinstance(model, (str, Path)) else "model")
    all_recs = read_pad_records(pad_path)
    recs = [(ln, r) for ln, r in all_recs if select is None or select in r["image"]]
    recs = recs[:max_images]
    if not recs:
        raise DataError(f"no PAD record selected (select={select!r}, max_images={max_images})",
                        pad_path)
    cap_map = _caption_map(captions)
    tok = adapter.tokenizer
    emb = adapter.input_embeddings().weight.detach().float().cpu()     # (V, d)
    gh, gw, off = token_layout(adapter)

    # 1. vision tokens before/after the projector, region targets ----------------------
    before_l, after_l, targets, images = [], [], [], []
    for s in range(0, len(recs), batch_size):
        chunk = recs[s:s + batch_size]
        ims = []
        for ln, r in chunk:
            p = resolve_under(image_root, r["image"], source=pad_path, line=ln, field="image")
            im = load_image(p, source=pad_path, line=ln, field="image")
            if (im.height, im.width) != (r["height"], r["width"]):
                raise DataError(f"image is {im.height}x{im.width} but the record says "
                                f"{r['height']}x{r['width']} (height x width)", pad_path, ln,
                                "image")
            ims.append(im)
            targets.append(region_targets(r, adapter, theta, where=(pad_path, ln)))
        b, a = vision_tokens(adapter, ims)
        before_l.append(b)
        after_l.append(a)
        images.extend(ims[:max(0, n_heatmaps - len(images))])
    before = torch.cat(before_l)                                       # (B, N, d_v)
    after = torch.cat(after_l)                                         # (B, N, d)
    n_img, n_tok, d = after.shape

    # 2. compression (SPEC §5 matrix entropy) ------------------------------------------
    h_before = [matrix_entropy(x) for x in before]
    h_after = [matrix_entropy(x) for x in after]
    h_text = []
    special = set(int(i) for i in getattr(tok, "all_special_ids", []))
    for (_, r), tgt in zip(recs, targets):
        cap = cap_map.get(r["image"]) or r.get("caption") or \
            ("a picture of " + ", ".join(f"a {x}" for x in tgt.labels) if tgt.labels else "")
        ids = [int(i) for i in tok(cap, add_special_tokens=False)["input_ids"]
               if int(i) not in special] if cap else []
        if len(ids) >= 2:
            h_text.append(matrix_entropy(emb[ids]))
    entropy = {"H_before": float(np.mean(h_before)), "H_after": float(np.mean(h_after)),
               "delta_H": float(np.mean(h_before) - np.mean(h_after)),
               "H_text": float(np.mean(h_text)) if h_text else float("nan"),
               "H_max_before": math.log(min(n_tok, before.shape[-1])),
               "H_max_after": math.log(min(n_tok, d))}

    # 3. Align(V, W) ------------------------------------------------------------------
    idx = torch.tensor([i for i, t in enumerate(targets) for _ in range(len(t))], dtype=torch.long)
    k_tot = int(idx.numel())
    flat_ids = [ids for t in targets for ids in t.token_ids]
    flat_labels = [lab for t in targets for lab in t.labels]
    if k_tot == 0:
        raise DataError("the selected PAD records have no usable region", pad_path)
    sets = torch.from_numpy(np.concatenate([t.patch_sets for t in targets]))      # (K, N)
    t_emb = torch.stack([emb[ids].mean(0) for ids in flat_ids])                    # (K, d)
    align = alignment_report(after, t_emb, sets, idx)

    # 4. region → phrase retrieval over every label of the PAD file -------------------
    cand = sorted({reg["label"].strip() for _, r in all_recs for reg in r["regions"]
                   if label_token_ids(tok, reg["label"])})
    c_emb = F.normalize(torch.stack([emb[label_token_ids(tok, c)].mean(0) for c in cand]), dim=-1)
    z = region_embeddings(after, sets, pooling="mean", region_image_index=idx)      # (K, d)
    scores = F.normalize(z, dim=-1) @ c_emb.T                                       # (K, C)
    gold = torch.tensor([cand.index(lab.strip()) for lab in flat_labels])
    g_score = scores[torch.arange(k_tot), gold].unsqueeze(1)
    # rank of the gold label; ties must not favour it (MMEB rule): equal scores count above
    rank = (scores > g_score).sum(1) + (scores == g_score).sum(1) - 1
    retrieval = {"top1": float((rank == 0).float().mean()),
                 "top5": float((rank < 5).float().mean()),
                 "n_candidates": len(cand), "chance": 1.0 / len(cand)}

    # 5. matching pursuit over the vocabulary --------------------------------------------
    vocab = emb.shape[0]
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[:min(vocab, len(tok))] = True
    allowed[[i for i in special if i < vocab]] = False
    flat_tokens = after.reshape(n_img * n_tok, d)
    mp = matching_pursuit(flat_tokens, emb, k_max=k_max, allowed=allowed)
    energy = mp.explained_energy                                       # (B·N, K+1)
    atoms = mp.atoms.view(n_img, n_tok, k_max)
    n_allowed = int(allowed.sum())
    ks = sorted({k for k in (1, 5, k_max) if k <= k_max})
    recovery: dict[str, float | None] = {}
    for k in ks:
        reg_hit, patch_frac, chance_patch = [], [], []
        for j in range(k_tot):
            lab = set(flat_ids[j])
            rows = atoms[idx[j]][sets[j]][:, :k]                       # (|S_k|, k)
            hits = torch.tensor([bool(lab & set(r.tolist())) for r in rows])
            reg_hit.append(bool(hits.any()))
            patch_frac.append(float(hits.float().mean()))
            chance_patch.append(_chance_hit(n_allowed, len(lab), k))
        recovery[f"region@{k}"] = float(np.mean(reg_hit))
        recovery[f"patch@{k}"] = float(np.mean(patch_frac))
        recovery[f"chance_patch@{k}"] = float(np.mean(chance_patch))
    a50, r50 = _atoms_to_reach(energy, 0.5)
    a80, r80 = _atoms_to_reach(energy, 0.8)
    mp_report = {"k_max": k_max, "n_patches": int(flat_tokens.shape[0]), "n_atoms": n_allowed,
                 "explained_energy": [float(x) for x in energy.mean(0)],
                 "atoms_to_50": a50, "frac_reach_50": r50,
                 "atoms_to_80": a80, "frac_reach_80": r80, "recovery": recovery}

    # 6. files --------------------------------------------------------------------------
    files: dict[str, str] = {}
    rows, row_labels, coefs = [], [], []
    all_cov = np.concatenate([t.coverage for t in targets])                        # (K, N)
    for j in range(min(k_tot, n_atom_rows)):
        p = int(all_cov[j].argmax())
        g = p - off
        flat = int(idx[j]) * n_tok + p
        rows.append(mp.atoms[flat])
        coefs.append(mp.coefs[flat])
        row_labels.append(f"img{int(idx[j])} ({g // gw},{g % gw}) [{flat_labels[j]}]")
    from fam.analysis.plots import atoms_table
    table = atoms_table(torch.stack(rows), lambda i: _decode(tok, i), row_labels,
                        torch.stack(coefs), max_rows=n_atom_rows)
    atomic_write_text(out / "atoms.md",
                      f"# Matching-pursuit atoms of sample patches ({name})\n\n"
                      "One row per region: its best-covered patch (row, col) and label; atoms "
                      "in pick order with their coefficients (SPEC §5).\n\n" + table + "\n")
    files["atoms"] = "atoms.md"
    if plots:
        from fam.analysis.plots import (plot_entropy_comparison, plot_explained_energy,
                                        plot_similarity_heatmaps)
        plot_entropy_comparison({name: (entropy["H_before"], entropy["H_after"],
                                        entropy["H_text"])}, out / "entropy.png")
        plot_explained_energy({name: energy}, out / "explained_energy.png")
        files["entropy"] = "entropy.png"
        files["explained_energy"] = "explained_energy.png"
        patch = int(adapter.config.vision_config.patch_size)
        for i, im in enumerate(images):
            t = targets[i]
            if not len(t):
                continue
            t_img = torch.stack([emb[x].mean(0) for x in t.token_ids])           # (K_i, d)
            sims = similarity_map(after[i, off:], t_img)                         # (K_i, G·G)
            ious = patch_ious(sims, torch.from_numpy(t.patch_sets[:, off:]))
            tf = processor_transform(adapter.image_processor, (im.height, im.width), patch)
            plot_similarity_heatmaps(transform_image(im.convert("RGB"), tf),
                                     [m.view(gh, gw) for m in sims],
                                     [f"{lab} (IoU {float(u):.2f})" for lab, u in
                                      zip(t.labels, ious)],
                                     out / f"heatmaps_{i}.png")
            files[f"heatmaps_{i}"] = f"heatmaps_{i}.png"
    report = {"model": str(model) if isinstance(model, (str, Path)) else name,
              "pad": str(pad_path), "select": select, "theta": theta,
              "entropy": entropy, "align": align, "retrieval": retrieval,
              "matching_pursuit": mp_report,
              "counts": {"images": n_img, "regions": k_tot, "tokens_per_image": n_tok,
                         "grid": [gh, gw], "text_sequences": len(h_text)},
              "files": files}
    atomic_write_json(out / "alignment.json", jsonable(report))
    logger.info("alignment report of %s: ΔH=%.3f mIoU=%.3f in-mask cos=%.3f retrieval@1=%.3f",
                name, entropy["delta_H"], align["miou"], align["in_mask_cos"],
                retrieval["top1"])
    return report


def jsonable(obj: Any) -> Any:
    """NaN/inf → None so the JSON is strict (``json.loads`` in other languages accepts it)."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float):
        return _finite(obj)
    return obj
