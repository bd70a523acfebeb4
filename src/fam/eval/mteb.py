"""A fam model as an mteb encoder, with its modalities declared (``pip install -e ".[mteb]"``).

mteb treats an encoder without a :class:`mteb.models.model_meta.ModelMeta` as text-only and
refuses image and video tasks for it. :class:`MtebEncoder` wraps a fam embedding model (an
:class:`fam.model.EmbeddingModel`, e.g. from :func:`fam.load_embedding_model`) and declares
``text`` and ``image``, plus ``video`` when the model's family takes a video (Qwen2-VL/2.5-VL
natively, the multi-image families as frames), so mteb's image, video and visual-document
tasks run on it as they are::

    import fam, mteb
    from fam.eval.mteb import MtebEncoder
    enc = MtebEncoder(fam.load_embedding_model("runs/demo/fam/model"),
                      prompts={"query": "Find me an everyday image that matches the given caption: "})
    mteb.evaluate(enc, mteb.get_tasks(tasks=["VidoreArxivQARetrieval"]))

Each row of mteb's batches becomes one fam item, encoded by fam's own pipeline:

- ``text`` (when present) is the item's text, after the row's prompt (``prompts``: mteb's
  prompt keys, i.e. a task name, a task type, ``query``/``document`` or ``"{task}-{query}"``;
  nothing when none matches). ``<|image_1|>`` in a prompt places the image, as in fam data;
- ``image`` (a PIL image; document pages are images) is the item's image, first in the
  sequence unless the text places it;
- ``video`` (torchcodec's ``VideoDecoder``, as mteb's datasets give it, or frames as a
  ``(T, C, H, W)`` tensor/array or a list of PIL images) is the item's video: fam's 8 frames
  chosen by :func:`fam.data.video.sample_indices` over all of the video's frames (only those
  8 are decoded), handed to fam in memory (:class:`fam.data.types.Visuals`).

So mteb's scores equal those of the same items embedded with fam directly
(``tests/eval/test_mteb.py`` checks this on mteb's mock tasks).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from mteb.models.abs_encoder import AbsEncoder, get_prompt_name
from mteb.models.model_meta import ModelMeta
from PIL import Image

from fam.data.types import MMItem, Visuals
from fam.data.video import NUM_FRAMES, sample_indices
from fam.errors import ConfigError

__all__ = ["MtebEncoder", "model_meta", "modalities_of", "video_frames"]


def modalities_of(model: Any) -> list[str]:
    """``text``, ``image`` and, when the model's family takes videos, ``video``."""
    adapter = model.adapter
    return ["text", "image"] + (["video"] if adapter.video_input is not None else [])


def model_meta(model: Any, name: str | None = None, revision: str | None = None,
               prompts: dict[str, str] | None = None) -> ModelMeta:
    """The :class:`ModelMeta` mteb needs to run non-text tasks on ``model``.

    Args:
        model: a fam embedding model (``.adapter`` with ``family``, ``hidden_size``).
        name: mteb's ``organisation/model`` name (default ``fam/<family>``).
        revision: the model's revision, for mteb's result cache (default none).
        prompts: the prompts the encoder uses (``use_instructions`` is whether there are any).
    """
    adapter = model.adapter
    name = name or f"fam/{adapter.family}"
    if "/" not in name:
        raise ConfigError(f"mteb model name {name!r}: mteb needs 'organisation/model', e.g. "
                          f"'fam/{name}'", key="name")
    n_params = sum(p.numel() for p in adapter.model.parameters())
    max_tokens = getattr(getattr(adapter, "text_config", None), "max_position_embeddings", None)
    return ModelMeta(
        loader=None, name=name, revision=revision, release_date=None, languages=None,
        n_parameters=int(n_params), memory_usage_mb=None,
        max_tokens=float(max_tokens) if max_tokens else None, embed_dim=adapter.hidden_size,
        license=None, open_weights=True, public_training_code=None,
        public_training_data=None, framework=["PyTorch"], similarity_fn_name="cosine",
        use_instructions=bool(prompts), training_datasets=None,
        modalities=modalities_of(model), model_type=["dense"])


def _to_pil(frame: Any) -> Image.Image:
    if isinstance(frame, Image.Image):
        return frame
    arr = frame.detach().cpu().numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame)
    if arr.ndim != 3 or arr.shape[0] not in (1, 3, 4) or arr.dtype != np.uint8:
        raise ConfigError(f"a video frame must be a PIL image or a (C, H, W) uint8 array with "
                          f"1, 3 or 4 channels (torchcodec's layout); got shape "
                          f"{tuple(arr.shape)}, dtype {arr.dtype}", key="video")
    arr = np.ascontiguousarray(arr.transpose(1, 2, 0))
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)


def video_frames(video: Any, num_frames: int = NUM_FRAMES) -> list[Image.Image]:
    """The frames fam feeds the model from one of mteb's videos: ``num_frames`` chosen by
    :func:`fam.data.video.sample_indices` over all frames (only those are decoded).

    Args:
        video: a torchcodec ``VideoDecoder``, a ``(T, C, H, W)`` uint8 tensor/array, or a
            list of PIL images / ``(C, H, W)`` arrays.
    """
    if hasattr(video, "get_frames_at") and hasattr(video, "metadata"):
        n = video.metadata.num_frames
        if not n:
            raise ConfigError("an mteb video has no frame count in its metadata; fam samples "
                              "frames by index and needs it", key="video")
        batch = video.get_frames_at(sample_indices(int(n), num_frames)).data
        return [_to_pil(f) for f in batch]
    if isinstance(video, (torch.Tensor, np.ndarray)):
        if video.ndim != 4:
            raise ConfigError(f"a video tensor must be (T, C, H, W); got shape "
                              f"{tuple(video.shape)}", key="video")
    elif not isinstance(video, (list, tuple)) or not len(video):
        raise ConfigError(f"an mteb video must be a VideoDecoder, a (T, C, H, W) array or a "
                          f"non-empty list of frames; got {type(video).__name__}", key="video")
    return [_to_pil(video[i]) for i in sample_indices(len(video), num_frames)]


class MtebEncoder(AbsEncoder):
    """A fam embedding model as an mteb encoder (see the module docstring).

    Args:
        model: a fam embedding model (``encode_all(items, batch_size=, images=)`` and
            ``.adapter``), e.g. ``fam.load_embedding_model(path)``.
        prompts: mteb prompt key → instruction put before the row's text.
        name, revision: mteb's model name and revision (:func:`model_meta`).
        batch_size: items per forward inside fam's pipeline (mteb's batches are regrouped).
    """

    def __init__(self, model: Any, *, prompts: dict[str, str] | None = None,
                 name: str | None = None, revision: str | None = None, batch_size: int = 32):
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: must be >= 1", key="batch_size")
        self.model = model
        self.batch_size = batch_size
        self.model_prompts = self.validate_task_to_prompt_name(dict(prompts)) if prompts else None
        self.mteb_model_meta = model_meta(model, name, revision, prompts)

    def prompt_for(self, task_metadata: Any, prompt_type: Any) -> str:
        """The instruction put before a row's text for this task and side ("" if none)."""
        key = get_prompt_name(self.model_prompts, task_metadata, prompt_type)
        return self.model_prompts[key] if key and self.model_prompts else ""

    def rows_to_items(self, batch: dict[str, Sequence[Any]], prompt: str
                      ) -> tuple[list[MMItem], list[Image.Image | Visuals | None]]:
        """One fam item and its in-memory visuals (an image, or :class:`Visuals` with a
        video's 8 frames) per row of an mteb batch."""
        n = len(next(iter(batch.values())))
        texts = batch.get("text") or [None] * n
        images = batch.get("image") or [None] * n
        videos = batch.get("video") or [None] * n
        items: list[MMItem] = []
        visuals: list[Image.Image | Visuals | None] = []
        for text, image, video in zip(texts, images, videos):
            items.append(MMItem(prompt + (text or "")))
            if video is None:
                visuals.append(image)
            else:
                visuals.append(Visuals(images=() if image is None else (image,),
                                       video=video_frames(video)))
        return items, visuals

    def encode(self, inputs: Any, *, task_metadata: Any, hf_split: str, hf_subset: str,
               prompt_type: Any = None, **kwargs: Any) -> np.ndarray:
        """Embed mteb's batches; (n, d) float32 unit rows in input order."""
        prompt = self.prompt_for(task_metadata, prompt_type)
        out: list[np.ndarray] = []
        for batch in inputs:  # one mteb batch at a time: decoded pages/frames stay bounded
            items, visuals = self.rows_to_items(batch, prompt)
            emb = self.model.encode_all(
                items, batch_size=self.batch_size, desc=f"mteb {task_metadata.name}",
                images=visuals if any(v is not None for v in visuals) else None)
            out.append(emb.float().cpu().numpy())
        if not out:
            return np.zeros((0, self.model.adapter.hidden_size), dtype=np.float32)
        return np.concatenate(out)
