"""Model stages of PAD: Grounding DINO boxes (with class-aware NMS) and box-prompted SAM.

Both load from local ``save_pretrained`` folders and import transformers only when
constructed. Thresholds default to the original PAD run (method.md §4).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from fam.errors import DataError
from fam.pad.protocols import Detection, ImageMeta

logger = logging.getLogger(__name__)

__all__ = ["HFGroundingDinoDetector", "HFSamSegmenter", "box_iou", "nms", "batched_nms"]


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
        iou_threshold: suppression threshold (0.5 in PAD, method.md §4).

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
    at ``nms_iou`` (method.md §4: 0.25 / 0.2 / 0.5).

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
