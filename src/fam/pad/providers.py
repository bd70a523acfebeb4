"""The three pluggable stages of the PAD pipeline (SPEC §4): tagger → detector → segmenter.

The original PAD run used RAM (tags) → Grounding DINO (boxes; box threshold 0.25, text
threshold 0.2, NMS 0.5) → SAM (box-prompted masks). RAM is not in transformers, so the
taggers here read tags from captions (:class:`CaptionNounTagger`) or take a fixed list
(:class:`ListTagger`). :class:`GroundTruthProvider` plays all three roles from an existing
PAD file (the Scenes benchmark's ``pad.jsonl``), which makes the pipeline testable
end to end without models.

Every stage receives the image as a PIL RGB image and, as the keyword ``meta``, the
image's :class:`ImageMeta` (relative and absolute path); model-based stages ignore it.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from PIL import Image

from fam.errors import DataError
from fam.pad.records import PadRecord, read_pad, region_mask
from fam.utils.io import read_jsonl

logger = logging.getLogger(__name__)

__all__ = ["ImageMeta", "Detection", "Tagger", "Detector", "Segmenter", "ListTagger",
           "CaptionNounTagger", "load_captions", "extract_noun_phrases", "STOP_WORDS",
           "GroundTruthProvider", "HFGroundingDinoDetector", "HFSamSegmenter", "box_iou",
           "nms", "batched_nms", "save_tiny_grounding_dino", "save_tiny_sam"]


@dataclass(frozen=True)
class ImageMeta:
    """Where an image comes from.

    Attributes:
        image: path relative to the image root (the PAD record's ``image``).
        path: absolute path of the file.
    """

    image: str
    path: Path


class Detection(NamedTuple):
    """One detected box: ``label`` (one of the prompted tags), ``score`` in [0, 1],
    ``box`` ``(x0, y0, x1, y1)`` in pixels of the original image."""

    label: str
    score: float
    box: tuple[float, float, float, float]


@runtime_checkable
class Tagger(Protocol):
    """Stage 1: the labels to look for in an image (RAM in the paper)."""

    def tags(self, image: Image.Image, meta: ImageMeta) -> list[str]:
        """Return the image's tags (deduplicated, in a deterministic order)."""
        ...


@runtime_checkable
class Detector(Protocol):
    """Stage 2: open-vocabulary boxes for the given labels (Grounding DINO in the paper)."""

    def detect(self, image: Image.Image, labels: Sequence[str], *,
               meta: ImageMeta | None = None) -> list[Detection]:
        """Return detections whose ``label`` is one of ``labels``, best score first."""
        ...


@runtime_checkable
class Segmenter(Protocol):
    """Stage 3: one mask per box (box-prompted SAM in the paper)."""

    def segment(self, image: Image.Image, boxes: Sequence[Sequence[float]], *,
                meta: ImageMeta | None = None) -> list[np.ndarray]:
        """Return one boolean ``(H, W)`` mask (the image's size) per box, in order."""
        ...


# --------------------------------------------------------------------------- taggers


class ListTagger:
    """Gives every image the same fixed tag list (a closed vocabulary)."""

    def __init__(self, tags: Iterable[str]):
        self._tags = _dedup(t.strip().lower() for t in tags if t.strip())
        if not self._tags:
            raise ValueError("ListTagger needs at least one non-empty tag")

    def tags(self, image: Image.Image, meta: ImageMeta) -> list[str]:
        return list(self._tags)


#: Words that never start, end or sit inside a tag: articles, pronouns, prepositions,
#: relation words, auxiliaries and caption filler ("a picture of", "in the image").
STOP_WORDS: frozenset[str] = frozenset("""
a an the this that these those there here it its it's they them their he she his her him
we our you your i me my is are was were be been being am has have had do does did
of in on at to from by with without into onto over under above below beside besides near
next behind before after between among around across along through against toward
towards up down out off left right top bottom front back middle center centre side
and or but nor so as than then while also very too just only some any each every all
both either neither other another such what which who whom whose where when why how
can could will would shall should may might must not no yes
picture pictures image images photo photos photograph view shot scene close closeup
showing shows shown show depicting depicts there's is's
one two three four five six seven eight nine ten several many few lots lot
""".split())

_WORD = re.compile(r"[a-z][a-z\-']*")


def extract_noun_phrases(caption: str, *, stop_words: frozenset[str] = STOP_WORDS,
                         max_words: int = 3) -> list[str]:
    """Cheap noun-phrase chunks of a caption (no POS tagger offline).

    Splits the lower-cased caption at punctuation and stop words; each maximal run of
    remaining words is a chunk ("small red circle"). English puts the head noun last,
    so a chunk longer than ``max_words`` keeps its last ``max_words`` words.

    Args:
        caption: free text.
        stop_words: words that break chunks.
        max_words: longest tag in words.

    Returns:
        Chunks in caption order, deduplicated.
    """
    chunks: list[str] = []
    for clause in re.split(r"[.,;:!?()\"\[\]]", caption.lower()):
        run: list[str] = []
        for w in _WORD.findall(clause) + [None]:  # None flushes the last run
            if w is None or w in stop_words:
                if run:
                    chunks.append(" ".join(run[-max_words:]))
                run = []
            else:
                run.append(w)
    return _dedup(chunks)


def load_captions(paths: str | Path | Sequence[str | Path],
                  fields: Sequence[str] = ("caption", "blip_caption")) -> dict[str, str]:
    """Read LLaVA-style caption files into ``{image: caption}``.

    Accepts a JSON list or a JSONL file of ``{image, caption | blip_caption | conversations}``
    rows (LLaVA pre-training format: the caption is the first ``gpt`` turn of
    ``conversations``). The first present field of ``fields`` wins.

    Raises:
        DataError: a file is missing or malformed, or a row has no image or caption
            (names file, row and field).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: dict[str, str] = {}
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise DataError("captions file not found", p)
        if p.suffix == ".jsonl":
            rows: Iterable[tuple[int, Any]] = read_jsonl(p)
        else:
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON ({e.msg})", p, e.lineno) from None
            if not isinstance(data, list):
                raise DataError("expected a JSON list of {image, caption} objects", p)
            rows = enumerate(data, start=1)
        for i, row in rows:
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                raise DataError("row needs a string 'image'", p, i, "image")
            cap = next((row[f] for f in fields if isinstance(row.get(f), str)), None)
            if cap is None and isinstance(row.get("conversations"), list):
                cap = next((t.get("value") for t in row["conversations"]
                            if isinstance(t, dict) and t.get("from") == "gpt"), None)
            if not isinstance(cap, str):
                raise DataError(f"row has no caption (looked for {list(fields)} and "
                                "'conversations')", p, i, fields[0] if fields else None)
            out[row["image"]] = cap
    return out


class CaptionNounTagger:
    """Tags from an image's caption (stands in for RAM, which transformers lacks).

    Without a vocabulary the tags are the caption's noun-phrase chunks
    (:func:`extract_noun_phrases`). With one, they are the vocabulary phrases that occur
    in the caption as whole words, longest first and non-overlapping (so "red circle"
    wins over "circle"); this is the closed-set mode RAM's tag list provides.

    Args:
        captions: ``{image: caption}`` or caption file(s) for :func:`load_captions`.
        vocabulary: optional allowed tags (phrases).
        fields: caption fields to read, in order of preference.
        max_words: longest tag in words (no-vocabulary mode).
        max_tags: keep at most this many tags per image (``None``: all).
    """

    def __init__(self, captions: dict[str, str] | str | Path | Sequence[str | Path], *,
                 vocabulary: Iterable[str] | None = None,
                 fields: Sequence[str] = ("caption", "blip_caption"), max_words: int = 3,
                 max_tags: int | None = None):
        self.captions = captions if isinstance(captions, dict) else load_captions(
            captions, fields)
        self.vocabulary = (sorted(_dedup(v.strip().lower() for v in vocabulary if v.strip()),
                                  key=lambda v: (-len(v.split()), v))
                           if vocabulary is not None else None)
        self.max_words = max_words
        self.max_tags = max_tags

    def tags_for_caption(self, caption: str) -> list[str]:
        """Tags of one caption (see the class docstring)."""
        if self.vocabulary is None:
            tags = extract_noun_phrases(caption, max_words=self.max_words)
        else:
            words = _WORD.findall(caption.lower())
            used = [False] * len(words)
            found: list[tuple[int, str]] = []
            for phrase in self.vocabulary:  # longest first
                pw = phrase.split()
                n = len(pw)
                for s in range(len(words) - n + 1):
                    if words[s:s + n] == pw and not any(used[s:s + n]):
                        used[s:s + n] = [True] * n
                        found.append((s, phrase))
            tags = _dedup(p for _, p in sorted(found))  # caption order
        return tags[: self.max_tags] if self.max_tags is not None else tags

    def tags(self, image: Image.Image, meta: ImageMeta) -> list[str]:
        cap = self.captions.get(meta.image)
        if cap is None:
            raise DataError(f"no caption for image {meta.image!r}; add it to the captions "
                            "file or use a list tagger", meta.path, field="caption")
        return self.tags_for_caption(cap)


def _dedup(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


# --------------------------------------------------------------------------- ground truth


class GroundTruthProvider:
    """Tagger, detector and segmenter that replay an existing PAD file (e.g. Scenes').

    ``tags`` returns the record's tags, ``detect`` its regions whose label is asked for
    (score and box as stored), ``segment`` the stored mask of each box. Running the
    pipeline with it reproduces the ground truth, up to the pipeline's own filters.

    Args:
        pad_path: the ground-truth ``pad.jsonl``.
        image_root: root of its image paths (default: the file's folder).
    """

    def __init__(self, pad_path: str | Path, image_root: str | Path | None = None):
        self.pad_path = Path(pad_path)
        self.records: dict[str, PadRecord] = {
            r.image: r for r in read_pad(self.pad_path, image_root)}

    def _record(self, meta: ImageMeta | None) -> PadRecord:
        if meta is None:
            raise ValueError("GroundTruthProvider needs meta= to know which image it sees")
        rec = self.records.get(meta.image)
        if rec is None:
            raise DataError(f"image {meta.image!r} has no ground-truth record",
                            self.pad_path, field="image")
        return rec

    def tags(self, image: Image.Image, meta: ImageMeta) -> list[str]:
        rec = self._record(meta)
        return list(rec.tags) or _dedup(r.label for r in rec.regions)

    def detect(self, image: Image.Image, labels: Sequence[str], *,
               meta: ImageMeta | None = None) -> list[Detection]:
        wanted = set(labels)
        dets = [Detection(r.label, float(r.score), tuple(r.box))
                for r in self._record(meta).regions if r.label in wanted]
        return sorted(dets, key=lambda d: -d.score)  # stable: ties keep file order

    def segment(self, image: Image.Image, boxes: Sequence[Sequence[float]], *,
                meta: ImageMeta | None = None) -> list[np.ndarray]:
        regions = list(self._record(meta).regions)
        used = [False] * len(regions)
        out = []
        for box in boxes:
            # Boxes come from detect(), so an exact match exists; take each region once
            # so that two objects with the same box keep their own masks.
            k = next((i for i, r in enumerate(regions)
                      if not used[i] and list(r.box) == list(box)), None)
            if k is None:
                raise ValueError(f"box {list(box)} is not a ground-truth box of "
                                 f"{self._record(meta).image}")
            used[k] = True
            out.append(region_mask(regions[k]))
        return out


# --------------------------------------------------------------------------- NMS


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of ``(N, 4)`` and ``(M, 4)`` xyxy boxes → ``(N, M)``."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression (same semantics as ``torchvision.ops.nms``).

    Boxes are visited by decreasing score; a box is dropped when its IoU with an already
    kept box is strictly greater than ``iou_threshold``.

    Args:
        boxes: ``(N, 4)`` xyxy.
        scores: ``(N,)``.
        iou_threshold: suppression threshold (0.5 in PAD, SPEC §4).

    Returns:
        ``(K,)`` int64 indices of the kept boxes, by decreasing score.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.argsort(scores, descending=True, stable=True)
    iou = box_iou(boxes[order], boxes[order])  # (N, N); N <= num_queries (900)
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long)]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor,
                iou_threshold: float) -> torch.Tensor:
    """Class-aware NMS: boxes of different ``classes`` never suppress each other.

    Uses torchvision's trick of shifting each class's boxes by a class-dependent offset
    larger than any coordinate, so one NMS pass cannot overlap boxes across classes.

    Returns:
        ``(K,)`` indices of kept boxes by decreasing score.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    span = boxes.max() - boxes.min() + 1
    shifted = boxes + (classes.to(boxes) * span)[:, None]
    return nms(shifted, scores, iou_threshold)


def _nms_detections(dets: list[Detection], iou_threshold: float) -> list[Detection]:
    if not dets:
        return []
    labels = sorted({d.label for d in dets})
    boxes = torch.tensor([d.box for d in dets], dtype=torch.float64)
    scores = torch.tensor([d.score for d in dets], dtype=torch.float64)
    classes = torch.tensor([labels.index(d.label) for d in dets])
    return [dets[i] for i in batched_nms(boxes, scores, classes, iou_threshold).tolist()]


# --------------------------------------------------------------------------- HF models


def _torch_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def _check_model_dir(model_dir: str | Path, what: str) -> Path:
    p = Path(model_dir)
    if not (p / "config.json").is_file():
        raise DataError(f"{what}: {p} is not a saved model folder (no config.json); pass "
                        "a local directory written by save_pretrained", p)
    return p


class HFGroundingDinoDetector:
    """Grounding DINO (transformers) as an open-vocabulary detector, from a local folder.

    The prompt is ``"tag1. tag2. ..."`` (lower-case, as Grounding DINO was trained);
    long tag lists are split over several prompts that fit ``config.max_text_len``. The
    processor's ``post_process_grounded_object_detection`` keeps queries whose best token
    probability exceeds ``box_threshold`` and whose tokens above ``text_threshold`` form
    the phrase. Each kept query is then labelled with the one tag whose tokens hold its
    highest above-``text_threshold`` probability (the raw phrase can straddle tags, e.g.
    "red circle blue"); queries with no such token are dropped. Finally class-aware NMS
    at ``nms_iou`` (SPEC §4: 0.25 / 0.2 / 0.5).

    Args:
        model_dir: folder with the model and processor (``save_pretrained`` output).
        box_threshold, text_threshold, nms_iou: see above.
        device: torch device (default CPU).
        max_detections: keep at most this many per image after NMS (``None``: all).
    """

    def __init__(self, model_dir: str | Path, *, box_threshold: float = 0.25,
                 text_threshold: float = 0.2, nms_iou: float = 0.5,
                 device: str | torch.device | None = None, max_detections: int | None = None):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.model_dir = _check_model_dir(model_dir, "Grounding DINO")
        # Without torchvision, AutoProcessor resolves the *Pil image-processor variant.
        self.processor = AutoProcessor.from_pretrained(self.model_dir, local_files_only=True)
        self.device = _torch_device(device)
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(
            self.model_dir, local_files_only=True).to(self.device).eval()
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.nms_iou = nms_iou
        self.max_detections = max_detections
        self.max_text_len = int(getattr(self.model.config, "max_text_len", 256))

    def _prompts(self, labels: Sequence[str]) -> list[list[str]]:
        """Greedily pack labels into prompts of at most ``max_text_len`` tokens."""
        tok = self.processor.tokenizer
        groups: list[list[str]] = []
        cur: list[str] = []
        cur_len = 2  # [CLS] ... [SEP]
        for lab in labels:
            n = len(tok(lab + ".", add_special_tokens=False)["input_ids"])
            if cur and cur_len + n > self.max_text_len:
                groups.append(cur)
                cur, cur_len = [], 2
            cur.append(lab)
            cur_len += n
        if cur:
            groups.append(cur)
        return groups

    @torch.no_grad()
    def _detect_prompt(self, image: Image.Image, labels: list[str]) -> list[Detection]:
        # Build the prompt ourselves so we know each label's character span.
        spans, parts, pos = [], [], 0
        for lab in labels:
            spans.append((pos, pos + len(lab)))
            parts.append(lab)
            pos += len(lab) + 2  # ". "
        prompt = ". ".join(parts) + "."
        inputs = self.processor(images=image, text=prompt, return_tensors="pt")
        enc = self.processor.tokenizer(prompt, return_offsets_mapping=True,
                                       truncation=True, max_length=self.max_text_len)
        if enc["input_ids"] != inputs["input_ids"][0].tolist():
            raise RuntimeError("the Grounding DINO processor tokenised the prompt differently "
                               "from its tokenizer; cannot map tokens to labels")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        out = self.model(**inputs)
        w, h = image.size
        res = self.processor.post_process_grounded_object_detection(
            out, inputs["input_ids"], threshold=self.box_threshold,
            text_threshold=self.text_threshold, target_sizes=[(h, w)])[0]

        # Same selection as the post-processing, to line its boxes up with the probs.
        probs = torch.sigmoid(out.logits[0].float())  # (Q, max_text_len)
        kept = probs.max(dim=-1).values > self.box_threshold
        probs = probs[kept]
        if len(probs) != len(res["boxes"]):  # the post-processing changed semantics
            raise RuntimeError("Grounding DINO post-processing kept a different number of "
                               "boxes than expected; check the transformers version")
        # Token → label index (-1: special token or separator).
        tok_label = torch.full((probs.shape[1],), -1, dtype=torch.long)
        for t, (a, b) in enumerate(enc["offset_mapping"][: probs.shape[1]]):
            if b > a:
                for j, (s, e) in enumerate(spans):
                    if s <= a and b <= e:
                        tok_label[t] = j
                        break
        valid = tok_label >= 0
        dets: list[Detection] = []
        for q in range(len(probs)):
            p = torch.where(valid & (probs[q] > self.text_threshold), probs[q], -1.0)
            t = int(p.argmax())
            if p[t] < 0:
                continue  # no label token passed the text threshold
            x0, y0, x1, y1 = (float(v) for v in res["boxes"][q].tolist())
            x0, x1 = min(max(x0, 0.0), w), min(max(x1, 0.0), w)
            y0, y1 = min(max(y0, 0.0), h), min(max(y1, 0.0), h)
            if x1 <= x0 or y1 <= y0:
                continue
            dets.append(Detection(labels[int(tok_label[t])], float(res["scores"][q]),
                                  (x0, y0, x1, y1)))
        return dets

    def detect(self, image: Image.Image, labels: Sequence[str], *,
               meta: ImageMeta | None = None) -> list[Detection]:
        # Prompt text per label: lower-case, and no "." inside (it separates phrases).
        # Detections carry the caller's label, so regions match the record's tags.
        original: dict[str, str] = {}
        for lab in labels:
            text = re.sub(r"[.\s]+", " ", lab).strip().lower()
            if text:
                original.setdefault(text, lab)
        if not original:
            return []
        dets = [d._replace(label=original[d.label]) for group in self._prompts(list(original))
                for d in self._detect_prompt(image, group)]
        dets = _nms_detections(dets, self.nms_iou)
        return dets[: self.max_detections] if self.max_detections is not None else dets


class HFSamSegmenter:
    """Box-prompted SAM (transformers ``SamModel``) from a local folder.

    The image is embedded once; boxes go through the mask decoder in chunks of
    ``box_batch``. With ``multimask_output`` SAM proposes 3 masks per box and the one with
    the highest predicted IoU is kept; masks are upsampled to the image size by the
    processor's ``post_process_masks`` and thresholded at ``mask_threshold`` (logits).

    Args:
        model_dir: folder with the model and processor (``save_pretrained`` output).
        device: torch device (default CPU).
        multimask_output: choose among 3 candidates by predicted IoU (else SAM's single).
        mask_threshold: logit threshold of the upsampled mask.
        box_batch: boxes per decoder call (bounds memory on images with many regions).
    """

    def __init__(self, model_dir: str | Path, *, device: str | torch.device | None = None,
                 multimask_output: bool = True, mask_threshold: float = 0.0,
                 box_batch: int = 64):
        from transformers import SamModel, SamProcessor

        self.model_dir = _check_model_dir(model_dir, "SAM")
        self.processor = SamProcessor.from_pretrained(self.model_dir, local_files_only=True)
        self.device = _torch_device(device)
        self.model = SamModel.from_pretrained(self.model_dir, local_files_only=True).to(
            self.device).eval()
        self.multimask_output = multimask_output
        self.mask_threshold = mask_threshold
        self.box_batch = box_batch

    @torch.no_grad()
    def segment(self, image: Image.Image, boxes: Sequence[Sequence[float]], *,
                meta: ImageMeta | None = None) -> list[np.ndarray]:
        if len(boxes) == 0:
            return []
        boxes = [[float(v) for v in b] for b in boxes]
        inputs = self.processor(images=image, input_boxes=[boxes], return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device)
        emb = self.model.get_image_embeddings(pixel_values)  # once per image
        out_masks: list[np.ndarray] = []
        for s in range(0, len(boxes), self.box_batch):
            chunk = inputs["input_boxes"][:, s:s + self.box_batch].to(self.device)  # (1, n, 4)
            out = self.model(image_embeddings=emb, input_boxes=chunk,
                             multimask_output=self.multimask_output)
            low = out.pred_masks[0]  # (n, C, h, w) low-res logits, C = 3 or 1
            best = out.iou_scores[0].argmax(dim=-1)  # (n,) predicted-IoU choice
            low = low[torch.arange(low.shape[0]), best][:, None]  # (n, 1, h, w)
            full = self.processor.image_processor.post_process_masks(
                [low.float().cpu()], inputs["original_sizes"], inputs["reshaped_input_sizes"],
                mask_threshold=self.mask_threshold)[0]  # (n, 1, H, W) bool
            out_masks.extend(m[0].numpy().astype(bool) for m in full)
        return out_masks


# --------------------------------------------------------------------------- tiny models


def _tiny_wordpiece_vocab(words: Iterable[str]) -> dict[str, int]:
    """BERT WordPiece vocabulary: specials, punctuation, single letters (so no word is
    ever [UNK]) and the given whole words."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    toks = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "-", "'"] + letters
            + ["##" + c for c in letters]
            + sorted({w for t in words for w in _WORD.findall(t.lower())}))
    return {t: i for i, t in enumerate(_dedup(toks))}


def save_tiny_grounding_dino(out_dir: str | Path, words: Iterable[str] = (), *,
                             image_size: int = 128, seed: int = 0) -> Path:
    """Save a tiny random Grounding DINO (Swin + BERT, ~0.2 M params) with its processor.

    For tests and offline smoke runs: the real loading path
    (:class:`HFGroundingDinoDetector`) reads it like a hub checkpoint. Its boxes are
    random. The image processor is the PIL variant (no torchvision needed).

    Args:
        out_dir: folder to write (``save_pretrained`` layout).
        words: words to give whole-word tokens (others are spelled in letters).
        image_size: shortest image edge after preprocessing (longest: 1.5x); at least
            128, because the extra feature level (stride 64) must be over 1x1 pixel for
            its GroupNorm.
        seed: torch seed of the random weights.
    """
    from transformers import (BertConfig, BertTokenizerFast, GroundingDinoConfig,
                              GroundingDinoForObjectDetection, GroundingDinoProcessor,
                              SwinConfig)
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil)

    if image_size < 128:
        raise ValueError(f"image_size must be >= 128 (stride-64 features), got {image_size}")
    vocab = _tiny_wordpiece_vocab(words)
    tokenizer = BertTokenizerFast(vocab=vocab)
    backbone = SwinConfig(image_size=image_size, patch_size=4, embed_dim=8,
                          depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2,
                          out_indices=[2, 3, 4])
    text = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    # d_model must be a multiple of 32 (GroupNorm(32, d_model)); decoder_layers >= 2
    # because the box heads of layers 1.. are tied to layer 0's.
    cfg = GroundingDinoConfig(backbone_config=backbone, text_config=text, num_queries=20,
                              encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32,
                              decoder_ffn_dim=32, encoder_attention_heads=2,
                              decoder_attention_heads=2, d_model=32, encoder_n_points=2,
                              decoder_n_points=2, max_text_len=64)
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(cfg).eval()
    ip = GroundingDinoImageProcessorPil(
        size={"shortest_edge": image_size, "longest_edge": image_size * 3 // 2})
    out = Path(out_dir)
    model.save_pretrained(out)
    GroundingDinoProcessor(image_processor=ip, tokenizer=tokenizer).save_pretrained(out)
    return out


def save_tiny_sam(out_dir: str | Path, *, image_size: int = 64, seed: int = 0) -> Path:
    """Save a tiny random SAM (~20 K params) with its PIL processor (see
    :func:`save_tiny_grounding_dino`)."""
    from transformers import (SamConfig, SamMaskDecoderConfig, SamModel, SamProcessor,
                              SamPromptEncoderConfig, SamVisionConfig)
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    patch = 8
    vision = SamVisionConfig(hidden_size=16, output_channels=16, num_hidden_layers=1,
                             num_attention_heads=2, image_size=image_size, patch_size=patch,
                             window_size=4, global_attn_indexes=[0], mlp_dim=32,
                             num_pos_feats=8)
    prompt = SamPromptEncoderConfig(hidden_size=16, image_size=image_size, patch_size=patch,
                                    mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=16, mlp_dim=32, num_hidden_layers=2,
                                   num_attention_heads=2, iou_head_hidden_dim=16)
    torch.manual_seed(seed)
    model = SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt,
                               mask_decoder_config=decoder)).eval()
    low = image_size // 4  # SAM's low-res mask grid is a quarter of the input
    ip = SamImageProcessorPil(size={"longest_edge": image_size},
                              pad_size={"height": image_size, "width": image_size},
                              mask_size={"longest_edge": low},
                              mask_pad_size={"height": low, "width": low})
    out = Path(out_dir)
    model.save_pretrained(out)
    SamProcessor(image_processor=ip).save_pretrained(out)
    return out
