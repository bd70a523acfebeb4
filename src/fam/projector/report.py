"""The alignment report of a LLaVA-style checkpoint: compression, Align(V, W), matching pursuit.

:func:`analyze_alignment` runs every method.md §5 analysis of arXiv 2505.17316 on the images of a
Patch-Aligned Dataset (PAD, method.md §4) file and writes ``alignment.json`` plus figures:

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

This is the analysis entry point of the projector unit: it reads the PAD file through
:func:`fam.pad.records.read_pad`, builds the same region targets as training
(:mod:`fam.projector.regions`) and taps the projector with :mod:`fam.projector.hooks`; the
generic measures come from :mod:`fam.analysis`.
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
from fam.analysis.matching_pursuit import matching_pursuit
from fam.data.captions import caption_map
from fam.data.images import load_image
from fam.errors import DataError
from fam.losses.patch import region_embeddings
from fam.pad.records import PadRecord, read_pad
from fam.projector.geometry import processor_transform, transform_image
from fam.projector.hooks import projector_module, vision_tokens
from fam.projector.regions import RegionTargets, label_token_ids, region_targets, token_layout
from fam.utils.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["analyze_alignment", "jsonable"]


def _load_adapter(model: Any) -> Any:
    if isinstance(model, (str, Path)):
        from fam.backbones import load_backbone
        return load_backbone(model)
    return model


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


@dataclass
class _Tokens:
    """The vision tokens of the analysed images and their region targets."""

    records: list[PadRecord]
    before: torch.Tensor  # (B, N, d_v) projector inputs
    after: torch.Tensor  # (B, N, d) projector outputs (what the LLM reads)
    targets: list[RegionTargets]
    images: list[Image.Image]  # the first few, for heatmaps


def _collect(adapter: Any, records: Sequence[PadRecord], pad_path: Path, theta: float,
             batch_size: int, n_images_kept: int) -> _Tokens:
    """Vision tokens before/after the projector and region targets, batch by batch."""
    before_l, after_l, targets, images = [], [], [], []
    for s in range(0, len(records), batch_size):
        ims = []
        for r in records[s:s + batch_size]:
            im = load_image(r.path, source=pad_path, line=r.line, field="image")
            if (im.height, im.width) != (r.height, r.width):
                raise DataError(f"image is {im.height}x{im.width} but the record says "
                                f"{r.height}x{r.width} (height x width)", pad_path, r.line,
                                "image")
            ims.append(im)
            targets.append(region_targets(r, adapter, theta))
        b, a = vision_tokens(adapter, ims)
        before_l.append(b)
        after_l.append(a)
        images.extend(ims[:max(0, n_images_kept - len(images))])
    return _Tokens(list(records), torch.cat(before_l), torch.cat(after_l), targets, images)


def _entropy(tok: _Tokens, tokenizer: Any, emb: torch.Tensor,
             cap_map: dict[str, str]) -> tuple[dict[str, float], int]:
    """Matrix entropy before/after the projector and of caption embeddings (method.md §5)."""
    n_tok, d = tok.after.shape[1:]
    h_before = [matrix_entropy(x) for x in tok.before]
    h_after = [matrix_entropy(x) for x in tok.after]
    h_text = []
    special = set(int(i) for i in getattr(tokenizer, "all_special_ids", []))
    for r, tgt in zip(tok.records, tok.targets):
        cap = cap_map.get(r.image) or r.extra.get("caption") or \
            ("a picture of " + ", ".join(f"a {x}" for x in tgt.labels) if tgt.labels else "")
        ids = [int(i) for i in tokenizer(cap, add_special_tokens=False)["input_ids"]
               if int(i) not in special] if cap else []
        if len(ids) >= 2:
            h_text.append(matrix_entropy(emb[ids]))
    return {"H_before": float(np.mean(h_before)), "H_after": float(np.mean(h_after)),
            "delta_H": float(np.mean(h_before) - np.mean(h_after)),
            "H_text": float(np.mean(h_text)) if h_text else float("nan"),
            "H_max_before": math.log(min(n_tok, tok.before.shape[-1])),
            "H_max_after": math.log(min(n_tok, d))}, len(h_text)


def _retrieval(after: torch.Tensor, sets: torch.Tensor, idx: torch.Tensor, labels: list[str],
               candidates: list[str], tokenizer: Any, emb: torch.Tensor) -> dict[str, Any]:
    """Region → phrase retrieval: each region's mean projected token vs every label."""
    c_emb = F.normalize(torch.stack([emb[label_token_ids(tokenizer, c)].mean(0)
                                     for c in candidates]), dim=-1)
    z = region_embeddings(after, sets, pooling="mean", region_image_index=idx)      # (K, d)
    scores = F.normalize(z, dim=-1) @ c_emb.T                                       # (K, C)
    gold = torch.tensor([candidates.index(lab.strip()) for lab in labels])
    g_score = scores[torch.arange(len(labels)), gold].unsqueeze(1)
    # rank of the gold label; ties must not favour it (MMEB rule): equal scores count above
    rank = (scores > g_score).sum(1) + (scores == g_score).sum(1) - 1
    return {"top1": float((rank == 0).float().mean()), "top5": float((rank < 5).float().mean()),
            "n_candidates": len(candidates), "chance": 1.0 / len(candidates)}


def _pursuit(after: torch.Tensor, sets: torch.Tensor, idx: torch.Tensor,
             label_ids: list[list[int]], tokenizer: Any, emb: torch.Tensor,
             k_max: int) -> tuple[dict[str, Any], Any]:
    """Matching pursuit of projected patches over the vocabulary, and label recovery."""
    n_img, n_tok, d = after.shape
    vocab = emb.shape[0]
    special = set(int(i) for i in getattr(tokenizer, "all_special_ids", []))
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[:min(vocab, len(tokenizer))] = True
    allowed[[i for i in special if i < vocab]] = False
    flat_tokens = after.reshape(n_img * n_tok, d)
    mp = matching_pursuit(flat_tokens, emb, k_max=k_max, allowed=allowed)
    energy = mp.explained_energy                                       # (B·N, K+1)
    atoms = mp.atoms.view(n_img, n_tok, k_max)
    n_allowed = int(allowed.sum())
    recovery: dict[str, float | None] = {}
    for k in sorted({k for k in (1, 5, k_max) if k <= k_max}):
        reg_hit, patch_frac, chance_patch = [], [], []
        for j in range(len(label_ids)):
            lab = set(label_ids[j])
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
    return {"k_max": k_max, "n_patches": int(flat_tokens.shape[0]), "n_atoms": n_allowed,
            "explained_energy": [float(x) for x in energy.mean(0)],
            "atoms_to_50": a50, "frac_reach_50": r50,
            "atoms_to_80": a80, "frac_reach_80": r80, "recovery": recovery}, mp


def _write_atoms(out: Path, name: str, mp: Any, tok: _Tokens, idx: torch.Tensor,
                 labels: list[str], tokenizer: Any, n_atom_rows: int, gw: int,
                 off: int) -> None:
    """``atoms.md``: the atoms of each region's best-covered patch."""
    from fam.analysis.plots import atoms_table
    n_tok = tok.after.shape[1]
    rows, row_labels, coefs = [], [], []
    all_cov = np.concatenate([t.coverage for t in tok.targets])                    # (K, N)
    for j in range(min(len(labels), n_atom_rows)):
        p = int(all_cov[j].argmax())
        g = p - off
        flat = int(idx[j]) * n_tok + p
        rows.append(mp.atoms[flat])
        coefs.append(mp.coefs[flat])
        row_labels.append(f"img{int(idx[j])} ({g // gw},{g % gw}) [{labels[j]}]")
    table = atoms_table(torch.stack(rows), lambda i: _decode(tokenizer, i), row_labels,
                        torch.stack(coefs), max_rows=n_atom_rows)
    atomic_write_text(out / "atoms.md",
                      f"# Matching-pursuit atoms of sample patches ({name})\n\n"
                      "One row per region: its best-covered patch (row, col) and label; atoms "
                      "in pick order with their coefficients (method.md §5).\n\n" + table
                      + "\n")


def _plot(out: Path, name: str, adapter: Any, tok: _Tokens, emb: torch.Tensor,
          entropy: dict[str, float], energy: Any, layout: tuple[int, int, int],
          ) -> dict[str, str]:
    """Entropy, explained-energy and per-image similarity-heatmap figures."""
    from fam.analysis.plots import (plot_entropy_comparison, plot_explained_energy,
                                    plot_similarity_heatmaps)
    gh, gw, off = layout
    plot_entropy_comparison({name: (entropy["H_before"], entropy["H_after"],
                                    entropy["H_text"])}, out / "entropy.png")
    plot_explained_energy({name: energy}, out / "explained_energy.png")
    files = {"entropy": "entropy.png", "explained_energy": "explained_energy.png"}
    patch = int(adapter.config.vision_config.patch_size)
    for i, im in enumerate(tok.images):
        t = tok.targets[i]
        if not len(t):
            continue
        t_img = torch.stack([emb[x].mean(0) for x in t.token_ids])               # (K_i, d)
        sims = similarity_map(tok.after[i, off:], t_img)                         # (K_i, G·G)
        ious = patch_ious(sims, torch.from_numpy(t.patch_sets[:, off:]))
        tf = processor_transform(adapter.image_processor, (im.height, im.width), patch)
        plot_similarity_heatmaps(transform_image(im.convert("RGB"), tf),
                                 [m.view(gh, gw) for m in sims],
                                 [f"{lab} (IoU {float(u):.2f})" for lab, u in
                                  zip(t.labels, ious)],
                                 out / f"heatmaps_{i}.png")
        files[f"heatmaps_{i}"] = f"heatmaps_{i}.png"
    return files


def analyze_alignment(model: str | Path | Any, pad_path: str | Path, image_root: str | Path,
                      out_dir: str | Path, *, max_images: int = 32, k_max: int = 10,
                      theta: float = 0.5, select: str | None = None,
                      captions: str | Path | None = None, batch_size: int = 16,
                      n_heatmaps: int = 3, n_atom_rows: int = 24, plots: bool = True,
                      name: str | None = None) -> dict[str, Any]:
    """Run the method.md §5 analyses of a LLaVA-style checkpoint on PAD images; write a report.

    Args:
        model: checkpoint directory (or an already loaded LLaVA adapter).
        pad_path: PAD JSONL (method.md §4); image paths relative to ``image_root``.
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
    pad_path = Path(pad_path)
    name = name or (Path(model).name if isinstance(model, (str, Path)) else "model")
    all_recs = read_pad(pad_path, image_root)
    recs = [r for r in all_recs if select is None or select in r.image][:max_images]
    if not recs:
        raise DataError(f"no PAD record selected (select={select!r}, max_images={max_images})",
                        pad_path)
    tokenizer = adapter.tokenizer
    emb = adapter.input_embeddings().weight.detach().float().cpu()     # (V, d)
    layout = token_layout(adapter)

    tok = _collect(adapter, recs, pad_path, theta, batch_size, n_heatmaps)
    entropy, n_text = _entropy(tok, tokenizer, emb, caption_map(captions) if captions else {})

    # Align(V, W) over every region of the selected images
    idx = torch.tensor([i for i, t in enumerate(tok.targets) for _ in range(len(t))],
                       dtype=torch.long)
    label_ids = [ids for t in tok.targets for ids in t.token_ids]
    labels = [lab for t in tok.targets for lab in t.labels]
    if not labels:
        raise DataError("the selected PAD records have no usable region", pad_path)
    sets = torch.from_numpy(np.concatenate([t.patch_sets for t in tok.targets]))    # (K, N)
    t_emb = torch.stack([emb[ids].mean(0) for ids in label_ids])                   # (K, d)
    align = alignment_report(tok.after, t_emb, sets, idx)

    # region → phrase retrieval over every label of the PAD file
    candidates = sorted({reg.label.strip() for r in all_recs for reg in r.regions
                         if label_token_ids(tokenizer, reg.label)})
    retrieval = _retrieval(tok.after, sets, idx, labels, candidates, tokenizer, emb)
    mp_report, mp = _pursuit(tok.after, sets, idx, label_ids, tokenizer, emb, k_max)

    _write_atoms(out, name, mp, tok, idx, labels, tokenizer, n_atom_rows, layout[1], layout[2])
    files = {"atoms": "atoms.md"}
    if plots:
        files.update(_plot(out, name, adapter, tok, emb, entropy, mp.explained_energy, layout))
    n_img, n_tok = tok.after.shape[:2]
    report = {"model": str(model) if isinstance(model, (str, Path)) else name,
              "pad": str(pad_path), "select": select, "theta": theta,
              "entropy": entropy, "align": align, "retrieval": retrieval,
              "matching_pursuit": mp_report,
              "counts": {"images": n_img, "regions": len(labels), "tokens_per_image": n_tok,
                         "grid": list(layout[:2]), "text_sequences": n_text},
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
