"""FAM pilot probes (method.md §5): what an embedding model keeps of objects, and where it looks.

Three probes, run on the Scenes evaluation images (``pad.jsonl`` gives each object's box and
referring expression) for any number of checkpoints:

* **global-local image-image similarity** — mean cosine between the embedding of a whole
  image (``<|image_1|>\\nRepresent the given image.``) and the embeddings of its object crops
  (the ground-truth box widened by a small margin, same instruction). The *mismatched*
  reference pairs each crop with another image's global embedding, so the gap says how
  much of the object survives in the global embedding beyond "it is a Scenes image".
* **object-caption similarity** — mean cosine between each crop's embedding and the
  embedding of its referring expression (text after a retrieval instruction), against a
  mismatched expression of an object with a different label from another image. The win
  rate is the fraction of crops whose own expression scores higher.
* **layer-wise attention of the embedding token** (FAM Fig. 3) — for every language-model
  layer, the attention mass that the EOS (embedding) position gives to image-token and to
  text-token positions, averaged over heads and samples. Two normalisations are
  reported: the raw mass (a softmax row sums to 1, so ``image + text + other = 1`` where
  *other* is the special tokens and the EOS token itself) and the mass per token (raw mass
  divided by the number of image / text tokens, which removes the effect of the image
  simply having more tokens). The layers with the largest raw image mass are the
  "vision-centric" layers, the candidates for VEIN (method.md §3).

Attention maps need eager attention; :func:`load_probe_model` loads checkpoints with
``attn_implementation="eager"`` and :func:`attention_probe` refuses any other.

Entry point: :func:`run_probes` (``fam analyze probes``); it writes ``probes.json``,
``probes.md`` and two PNG figures.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from fam.config import ProbeConfig
from fam.data.images import load_image
from fam.data.types import IMAGE_PLACEHOLDER, MMItem
from fam.errors import ConfigError, DataError
from fam.model import EmbeddingModel
from fam.pad.records import iter_pad
from fam.utils.io import atomic_write_json, atomic_write_text
from fam.utils.layers import negative_layer

log = logging.getLogger(__name__)

__all__ = ["ProbeConfig", "ProbeRegion", "ProbeImage", "load_probe_images", "pad_records",
           "crop_region", "load_probe_model", "embed_items", "similarity_probes", "attention_probe",
           "run_probes", "format_probes", "plot_similarity_probes", "plot_layer_attention"]


@dataclass
class ProbeRegion:
    box: tuple[int, int, int, int]  # [x0, y0, x1, y1) pixels, exclusive end
    label: str
    expression: str


@dataclass
class ProbeImage:
    path: Path  # absolute image path
    regions: list[ProbeRegion] = field(default_factory=list)


# --------------------------------------------------------------------------- data

def pad_records(data_dir: str | Path, split: str = "eval", max_images: int = 64) -> list[Any]:
    """The first ``max_images`` validated PAD records (:class:`fam.pad.records.PadRecord`, with
    region masks) of one split's images in ``<data_dir>/pad.jsonl``, counterfactual renders
    included (the multi-vector study's map check)."""
    prefix = f"images/{split}/"
    recs = [r for r in iter_pad(Path(data_dir) / "pad.jsonl", data_dir, select=prefix)
            if r.image.startswith(prefix)]
    if not recs:
        raise DataError(f"no image under {prefix!r}", Path(data_dir) / "pad.jsonl")
    return recs[:max_images]


def load_probe_images(data_dir: str | Path, split: str = "eval", max_images: int = 64,
                      ) -> list[ProbeImage]:
    """Primary scenes of one split with their objects, read from ``<data_dir>/pad.jsonl``.

    The file is read (and validated) by :func:`fam.pad.records.read_pad`. Counterfactual
    renders (``<id>-swap.png`` etc.) are skipped: they repeat a scene's objects. Images
    are taken in file order, so a run is deterministic. A region's ``expression`` (the
    Scenes generator writes one) defaults to ``"the <label>"``.

    Raises:
        DataError: no ``pad.jsonl``, a malformed record, or no image of the split.
    """
    data_dir = Path(data_dir)
    pad = data_dir / "pad.jsonl"
    if not pad.exists():
        raise DataError("no pad.jsonl here: point --data at a Scenes benchmark root "
                        "(written by `fam data scenes` or `fam demo`)", data_dir)
    prefix = f"images/{split}/"
    out: list[ProbeImage] = []
    for rec in iter_pad(pad, data_dir, select=prefix):
        if not rec.image.startswith(prefix) or "-" in Path(rec.image).stem:
            continue
        regions = [ProbeRegion(tuple(int(v) for v in r.box), r.label,
                               r.extra.get("expression") or f"the {r.label}")
                   for r in rec.regions]
        if regions:
            out.append(ProbeImage(data_dir / rec.image, regions))
        if len(out) >= max_images:
            break
    if not out:
        raise DataError(f"no image under {prefix!r} with regions", pad)
    return out


def crop_region(image: Image.Image, box: Sequence[int], margin: float = 0.15,
                min_margin_px: int = 2) -> Image.Image:
    """Crop ``box`` ([x0, y0, x1, y1), exclusive end) widened by a margin, inside the image.

    The margin keeps the object's outline and a little background, like a detector crop.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    m = max(int(round(margin * max(x1 - x0, y1 - y0))), min_margin_px)
    w, h = image.size
    return image.crop((max(x0 - m, 0), max(y0 - m, 0), min(x1 + m, w), min(y1 + m, h)))


# --------------------------------------------------------------------------- model

def load_probe_model(path: str | Path) -> EmbeddingModel:
    """Load a checkpoint as an embedding model with eager attention (needed for maps)."""
    from fam.backbones import load_backbone

    adapter = load_backbone(path, attn_implementation="eager")
    model = EmbeddingModel(adapter)
    model.eval()
    return model


def _attn_impl(model: EmbeddingModel) -> str | None:
    cfg = model.adapter.config
    impl = getattr(cfg, "_attn_implementation", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else None
    return getattr(text, "_attn_implementation", None) or impl


@torch.no_grad()
def embed_items(model: EmbeddingModel, items: Sequence[MMItem],
                images: Sequence[Image.Image | None], batch_size: int = 16) -> torch.Tensor:
    """(n, d) L2-normalised embeddings of items whose images are given in memory (crops)."""
    outs = []
    device = model.adapter.device
    for i in range(0, len(items), batch_size):
        batch = model.adapter.encode(items[i:i + batch_size], images[i:i + batch_size])
        outs.append(model(batch.to(device)).embedding.float().cpu())
    return torch.cat(outs) if outs else torch.zeros(0, model.adapter.hidden_size)


def _stats(x: torch.Tensor) -> dict[str, float]:
    x = x.double()
    return {"mean": float(x.mean()), "std": float(x.std(unbiased=False)), "n": int(x.numel())}


def _derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation without fixed points (n ≥ 2): a random cyclic shift of a shuffle."""
    order = rng.permutation(n)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = np.roll(order, -1)
    return perm


def similarity_probes(model: EmbeddingModel, images: Sequence[ProbeImage],
                      cfg: ProbeConfig | None = None) -> dict[str, Any]:
    """Global-local image-image and object-caption cosine probes.

    Returns:
        ``{"global_local": {matched, mismatched, gap, win_rate, n_crops},
        "object_caption": {...same keys...}}`` with ``matched``/``mismatched`` as
        ``{mean, std, n}`` over crops.
    """
    cfg = cfg or ProbeConfig()
    if len(images) < 2:
        raise ConfigError("the similarity probes need at least 2 images (the mismatched "
                          "references pair an object with another image)")
    rng = np.random.default_rng(cfg.seed)
    img_prompt = f"{IMAGE_PLACEHOLDER}\n{cfg.image_instruction}"
    pils = [load_image(str(im.path)) for im in images]
    g_items = [MMItem(img_prompt, im.path) for im in images]
    crop_items, crops, owner, labels, exprs = [], [], [], [], []
    for i, (im, pil) in enumerate(zip(images, pils)):
        for k, r in enumerate(im.regions):
            crop_items.append(MMItem(img_prompt, Path(f"{im.path}#crop{k}")))
            crops.append(crop_region(pil, r.box, cfg.margin, cfg.min_margin_px))
            owner.append(i)
            labels.append(r.label)
            exprs.append(r.expression)
    n = len(crops)
    txt_items = [MMItem(cfg.text_instruction + e, None,
                        content=(len(cfg.text_instruction), len(cfg.text_instruction) + len(e)))
                 for e in exprs]
    g = embed_items(model, g_items, pils, cfg.batch_size)  # (I, d)
    c = embed_items(model, crop_items, crops, cfg.batch_size)  # (n, d)
    t = embed_items(model, txt_items, [None] * n, cfg.batch_size)  # (n, d)
    owner_t = torch.tensor(owner)

    # Global-local: each crop against its own image and against another image's global.
    img_perm = torch.from_numpy(_derangement(len(images), rng))
    gl_match = (c * g[owner_t]).sum(-1)
    gl_mis = (c * g[img_perm[owner_t]]).sum(-1)

    # Object-caption: a mismatched expression is one of an object from another image with
    # a different label (same-label objects would share most words, blurring the gap).
    mis_idx = []
    for j in range(n):
        cands = [k for k in range(n) if owner[k] != owner[j] and labels[k] != labels[j]]
        if not cands:
            cands = [k for k in range(n) if owner[k] != owner[j]]
        mis_idx.append(int(rng.choice(cands)))
    oc_match = (c * t).sum(-1)
    oc_mis = (c * t[torch.tensor(mis_idx)]).sum(-1)

    def block(m: torch.Tensor, mm: torch.Tensor) -> dict[str, Any]:
        return {"matched": _stats(m), "mismatched": _stats(mm),
                "gap": float((m - mm).double().mean()),
                "win_rate": float((m > mm).double().mean()), "n_crops": n}

    return {"global_local": block(gl_match, gl_mis), "object_caption": block(oc_match, oc_mis),
            "n_images": len(images)}


@torch.no_grad()
def attention_probe(model: EmbeddingModel, images: Sequence[ProbeImage],
                    cfg: ProbeConfig | None = None) -> dict[str, Any]:
    """Layer-wise attention of the EOS (embedding) token to image vs text tokens.

    Each input is an image followed by :attr:`ProbeConfig.attention_prompt` filled with one
    of its objects' expressions. For layer ``l`` and sample ``b`` the EOS query row
    ``A_l[b, h, eos, :]`` (a softmax over the causal prefix) is summed over the image-token
    positions and over the text-content positions, then averaged over heads and samples.

    Returns:
        ``{"layers": [1..n], "image_mass", "text_mass", "other_mass", "image_per_token",
        "text_per_token", "image_share", "n_image_tokens", "n_text_tokens",
        "vision_centric_layers", "n_samples"}``; list entries are per layer (1 = first
        LM layer). ``image_share = image / (image + text)``. The vision-centric layers
        are given both 1-based and as negative indices (VeinConfig.layers style).

    Raises:
        ConfigError: the model does not run eager attention, or returns no maps.
    """
    cfg = cfg or ProbeConfig()
    impl = _attn_impl(model)
    if impl != "eager":
        raise ConfigError(f"the attention probe needs eager attention maps but the model runs "
                          f"{impl!r}; load it with load_probe_model() or "
                          f"load_backbone(path, attn_implementation='eager')")
    subset = list(images[:cfg.attention_images])
    items, pils = [], []
    for im in subset:
        expr = im.regions[0].expression
        items.append(MMItem(f"{IMAGE_PLACEHOLDER}\n" + cfg.attention_prompt.format(expression=expr),
                            im.path))
        pils.append(load_image(str(im.path)))
    n_layers = model.num_layers
    sums = {k: torch.zeros(n_layers, dtype=torch.float64)
            for k in ("image", "text", "other", "image_pt", "text_pt")}
    n_img_tok = n_txt_tok = 0.0
    device = model.adapter.device
    for i in range(0, len(items), cfg.batch_size):
        batch = model.adapter.encode(items[i:i + cfg.batch_size],
                                     pils[i:i + cfg.batch_size]).to(device)
        out = model(batch, output_attentions=True)
        att = out.attentions
        if att is None or len(att) != n_layers or any(a is None for a in att):
            raise ConfigError(f"the backbone returned {0 if att is None else len(att)} "
                              f"attention maps for {n_layers} layers; the attention probe "
                              f"needs eager attention")
        B = batch.batch_size
        rows = torch.arange(B, device=device)
        img_m = batch.image_mask.double()
        txt_m = batch.text_mask.double()
        n_img = img_m.sum(1).clamp(min=1)  # (B,)
        n_txt = txt_m.sum(1).clamp(min=1)
        n_img_tok += float(batch.image_mask.sum())
        n_txt_tok += float(batch.text_mask.sum())
        for l, a in enumerate(att):
            # (B, H, L, L) -> the EOS query row of every head, averaged over heads: (B, L)
            row = a[rows, :, batch.eos_index].double().mean(1)
            im_mass = (row * img_m).sum(1)
            tx_mass = (row * txt_m).sum(1)
            sums["image"][l] += im_mass.sum().cpu()
            sums["text"][l] += tx_mass.sum().cpu()
            sums["other"][l] += (row.sum(1) - im_mass - tx_mass).sum().cpu()
            sums["image_pt"][l] += (im_mass / n_img).sum().cpu()
            sums["text_pt"][l] += (tx_mass / n_txt).sum().cpu()
    n = len(items)
    mean = {k: (v / max(n, 1)).tolist() for k, v in sums.items()}
    share = [im / (im + tx) if im + tx > 0 else float("nan")
             for im, tx in zip(mean["image"], mean["text"])]
    top = sorted(range(n_layers), key=lambda l: -mean["image"][l])[:cfg.top_layers]
    top = sorted(top)
    return {"layers": list(range(1, n_layers + 1)), "image_mass": mean["image"],
            "text_mass": mean["text"], "other_mass": mean["other"],
            "image_per_token": mean["image_pt"], "text_per_token": mean["text_pt"],
            "image_share": share, "n_image_tokens": n_img_tok / max(n, 1),
            "n_text_tokens": n_txt_tok / max(n, 1),
            "vision_centric_layers": [l + 1 for l in top],  # att[l] is layer l + 1
            "vision_centric_layers_neg": [negative_layer(l + 1, n_layers) for l in top],
            "n_samples": n}


# --------------------------------------------------------------------------- report

def format_probes(results: Mapping[str, Any]) -> str:
    """Markdown tables of the probes, one row per model."""
    ms = results["models"]
    lines = ["| model | global-local matched | mismatched | gap | object-caption matched "
             "| mismatched | gap | win rate |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in ms.items():
        gl, oc = r["global_local"], r["object_caption"]
        lines.append(f"| {name} | {gl['matched']['mean']:.3f} | {gl['mismatched']['mean']:.3f} "
                     f"| {gl['gap']:+.3f} | {oc['matched']['mean']:.3f} "
                     f"| {oc['mismatched']['mean']:.3f} | {oc['gap']:+.3f} "
                     f"| {100 * oc['win_rate']:.0f}% |")
    lines += ["", "Attention of the embedding (EOS) token, raw mass per layer "
              "(image / text; other = special tokens and EOS itself):", ""]
    n_layers = max(len(r["attention"]["layers"]) for r in ms.values())
    lines.append("| model | " + " | ".join(f"L{l}" for l in range(1, n_layers + 1))
                 + " | vision-centric |")
    lines.append("|---|" + "---|" * (n_layers + 1))
    for name, r in ms.items():
        a = r["attention"]
        cells = [f"{im:.2f} / {tx:.2f}" for im, tx in zip(a["image_mass"], a["text_mass"])]
        cells += [""] * (n_layers - len(cells))
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {a['vision_centric_layers_neg']} |")
    return "\n".join(lines) + "\n"


def plot_similarity_probes(results: Mapping[str, Any], path: str | Path) -> Path:
    """Bars per model: the cosines (matched vs mismatched) and the matched − mismatched gaps."""
    from fam.analysis.plots import _plt, _save

    plt = _plt()
    ms = results["models"]
    names = list(ms)
    keys = [("global_local", "matched", "global-local"),
            ("global_local", "mismatched", "global-local (other image)"),
            ("object_caption", "matched", "object-caption"),
            ("object_caption", "mismatched", "object-caption (other expr.)")]
    colours = ["#1f77b4", "#aec7e8", "#d62728", "#ff9896"]
    x = np.arange(len(names))
    w = 0.8 / len(keys)
    # Two panels: raw cosines (tiny models' embeddings are anisotropic, so matched and
    # mismatched can both sit near 1) and the matched-minus-mismatched gaps, which are
    # what tells whether the embedding keeps the object.
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(8.0, 2.6 * len(names) + 3), 3.6),
                                  gridspec_kw={"width_ratios": [2, 1]})
    for j, ((probe, kind, label), col) in enumerate(zip(keys, colours)):
        vals = [ms[n][probe][kind]["mean"] for n in names]
        errs = [ms[n][probe][kind]["std"] for n in names]
        ax.bar(x + (j - (len(keys) - 1) / 2) * w, vals, w, yerr=errs, label=label, color=col,
               capsize=2)
    ax.set_xticks(x)
    ax.set_xticklabels(names)
    ax.set_ylabel("mean cosine (± std over crops)")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_title("FAM pilot probes: cosine similarity")
    ax.legend(fontsize=7, loc="best")
    w2 = 0.4
    for j, (probe, label, col) in enumerate([("global_local", "global-local", colours[0]),
                                             ("object_caption", "object-caption", colours[2])]):
        ax2.bar(x + (j - 0.5) * w2, [ms[n][probe]["gap"] for n in names], w2, label=label,
                color=col)
    ax2.set_xticks(x)
    ax2.set_xticklabels(names)
    ax2.axhline(0, color="black", lw=0.6)
    ax2.set_title("gap: matched − mismatched")
    ax2.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_layer_attention(results: Mapping[str, Any], path: str | Path,
                         per_token: bool = False) -> Path:
    """Per-layer attention of the embedding token to image (solid) and text (dashed) tokens."""
    from fam.analysis.plots import _plt, _save

    plt = _plt()
    ms = results["models"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    cmap = plt.get_cmap("tab10")
    ki, kt = ("image_per_token", "text_per_token") if per_token else ("image_mass", "text_mass")
    for c, (name, r) in enumerate(ms.items()):
        a = r["attention"]
        ax.plot(a["layers"], a[ki], "-o", color=cmap(c), label=f"{name}: image", ms=4)
        ax.plot(a["layers"], a[kt], "--s", color=cmap(c), label=f"{name}: text", ms=4)
    ax.set_xlabel("language-model layer")
    ax.set_ylabel("attention per token" if per_token else "attention mass (mean over heads)")
    ax.set_xticks(next(iter(ms.values()))["attention"]["layers"])
    ax.set_title("Embedding-token attention to image vs text tokens")
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def run_probes(models: Mapping[str, str | Path], data_dir: str | Path, out_dir: str | Path,
               cfg: ProbeConfig | None = None) -> dict[str, Any]:
    """Run every probe on every model; write ``probes.json``, ``probes.md`` and the plots.

    Args:
        models: ``{name: checkpoint dir}`` (e.g. stage0, vlm2vec, fam).
        data_dir: Scenes benchmark root (holds ``pad.jsonl`` and ``images/``).
        out_dir: output folder.
        cfg: probe settings.

    Returns:
        The content of ``probes.json``.
    """
    cfg = cfg or ProbeConfig()
    if not models:
        raise ConfigError("no model given; pass --models NAME=DIR [NAME=DIR ...]")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = load_probe_images(data_dir, cfg.split, cfg.max_images)
    log.info("probes: %d images, %d objects from %s", len(images),
             sum(len(i.regions) for i in images), data_dir)
    results: dict[str, Any] = {"settings": asdict(cfg), "data": str(data_dir), "models": {},
                               "paths": {k: str(v) for k, v in models.items()}}
    for name, path in models.items():
        t = time.time()
        model = load_probe_model(path)
        res = similarity_probes(model, images, cfg)
        res["attention"] = attention_probe(model, images, cfg)
        res["seconds"] = time.time() - t
        results["models"][name] = res
        log.info("probes %s: global-local %.3f (gap %+.3f), object-caption %.3f (gap %+.3f), "
                 "vision-centric layers %s (%.0f s)", name,
                 res["global_local"]["matched"]["mean"], res["global_local"]["gap"],
                 res["object_caption"]["matched"]["mean"], res["object_caption"]["gap"],
                 res["attention"]["vision_centric_layers_neg"], res["seconds"])
        del model
    results["plots"] = {
        "similarity": str(plot_similarity_probes(results, out / "probes_similarity.png")),
        "attention": str(plot_layer_attention(results, out / "probes_attention.png")),
        "attention_per_token": str(plot_layer_attention(
            results, out / "probes_attention_per_token.png", per_token=True)),
    }
    atomic_write_json(out / "probes.json", results)
    atomic_write_text(out / "probes.md", format_probes(results))
    return results
