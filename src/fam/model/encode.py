"""Fast inference: the encode path shared by ``encode``, ``eval``, export parity and the server.

:class:`EncodePipeline` embeds a list of items with an :class:`~fam.model.EmbeddingModel`:

* **Length-grouped batches.** Items are sorted by (number of images, image area, text length)
  before batching, so a batch holds sequences of similar length and padding (which the
  forward computes and throws away) stays small: a text-only item batched with image items
  is otherwise padded to the image items' length. Results come back in input order.
* **Preprocessing overlapped with the forward.** Image decoding, resizing, tokenisation and
  padding (``adapter.encode``) for the next batches run in a background thread while the
  model runs the current one. Threads, not DataLoader processes: PIL decoding/resizing and
  the Rust tokenizer release the GIL, and a thread shares the adapter without pickling it.
* **Only the last hidden state.** The forward asks the backbone for ``last_hidden_state``
  only (no ``output_hidden_states``), instead of keeping all ``num_layers + 1`` (B, L, d)
  states alive.
* **No LM head** when the model comes from :func:`load_embedding_model` (the head is never
  read from the checkpoint; see :mod:`fam.backbones.headless`).

:func:`encode_sequential` is the plain reference (the loop ``EmbeddingModel.encode`` ran
before): batches in input order, preprocessing then forward, all hidden states requested.
Parity tests and ``fam bench encode`` compare the pipeline against it.

Example (the server of ``fam serve`` does the same with in-memory images)::

    from fam.model.encode import EncodePipeline, load_embedding_model
    model = load_embedding_model("runs/demo/fam/model")
    pipe = EncodePipeline(model, batch_size=32)
    emb = pipe.encode(items)                       # (n, d) float32, L2-normalised, CPU
    emb = pipe.encode(items, images=[pil, None])   # images already in memory
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from fam.backbones.base import EncodedBatch
from fam.data.items import InputRules, check_mm_item, check_text
from fam.data.types import MMItem, Visuals
from fam.data.video import NUM_FRAMES
from fam.errors import InputError
from fam.model import EmbeddingModel, autocast_for

log = logging.getLogger(__name__)

__all__ = ["EncodePipeline", "encode_items", "encode_sequential", "load_embedding_model",
           "length_order"]

#: An entry of the ``images`` argument: one image, several, decoded images and video frames
#: (:class:`fam.data.types.Visuals`), or None (load from ``item.image``).
ImageArg = Image.Image | Sequence[Image.Image] | Visuals | None


def load_embedding_model(path: str | Path, *, device: str | torch.device | None = None,
                         **kwargs: Any) -> EmbeddingModel:
    """Load a checkpoint for embedding only: no LM head in memory, eval mode.

    Args:
        path: checkpoint directory or hub id (as :func:`fam.load_backbone`).
        device: where to put the model (default: stay on the CPU).
        **kwargs: forwarded to :func:`fam.load_backbone` (``adapter``, ``dtype``,
            ``attn_implementation``, ``max_text_tokens``, ``trust_remote_code``, ...).

    Returns:
        An :class:`EmbeddingModel` in eval mode. Remote-code families (Phi-3.5-V) keep their
        head: their loading code is the checkpoint's own.
    """
    from fam.backbones import load_backbone
    from fam.backbones.headless import drop_lm_head, embedding_only

    if kwargs.get("adapter") is None:
        with embedding_only():
            adapter = load_backbone(path, **kwargs)
    else:
        # peft finds the adapter's modules by the generative class's names: load the whole
        # model, merge, then let the head go.
        adapter = load_backbone(path, **kwargs)
        adapter.model = drop_lm_head(adapter.model)
    if device is not None:
        adapter.model.to(device)
    model = EmbeddingModel(adapter)
    model.eval()
    return model


def _image_area(path: Path | None) -> int:
    """Pixel area from the image header (no decoding); 0 when unreadable (loading reports it)."""
    if path is None:
        return 0
    try:
        with Image.open(path) as im:
            return im.width * im.height
    except Exception:  # noqa: BLE001 - a bomb, a corrupt header: opening it reports why
        return 0


def length_order(items: Sequence[MMItem], images: Sequence[ImageArg] | None = None) -> list[int]:
    """Indices of ``items`` sorted by (number of images, image area, text length).

    A cheap proxy for sequence length: image areas come from in-memory images or from the
    files' headers (nothing is decoded). The sort is stable, so equal keys keep input order.
    """
    def key(i: int) -> tuple[int, int, int]:
        it = items[i]
        im = images[i] if images is not None else None
        frames = im.video if isinstance(im, Visuals) else ()
        if im is None:
            paths = it.all_images
            n, area = len(paths), sum(_image_area(p) for p in paths)
        else:
            ims = _image_list(im)
            n, area = len(ims), sum(x.width * x.height for x in ims)
        if frames or it.video:  # NUM_FRAMES sampled frames of one size (fam.backbones.video)
            k = min(len(frames or it.video), NUM_FRAMES)
            first = frames[0].width * frames[0].height if frames else _image_area(it.video[0])
            n, area = n + k, area + k * first
        return n, area, len(it.text)

    return sorted(range(len(items)), key=key)


def check_encode_items(items: Sequence[MMItem], images: Sequence[ImageArg] | None,
                       rules: InputRules) -> None:
    """The input contract's text rules for items handed to the library directly.

    Items read by fam's own readers were checked already; this makes a Python call refuse
    what ``fam encode`` and ``fam serve`` refuse (an empty item, ``<|image_2|>`` with one
    image, ...), with the same reason. In-memory images are checked against the model's
    image limits too (files are, when they are opened).
    """
    # Decoded images passed their size limit where they were opened (a file, a request).
    shape = dataclasses.replace(rules.images, max_pixels=sys.maxsize)
    for i, it in enumerate(items):
        given = images[i] if images is not None else None
        if given is None:
            n = len(it.all_images)
            ims: list[Image.Image] = []
        else:
            ims = _image_list(given)
            n = len(ims)
        check_text(it.text, rules, path=it.source, line=it.line,
                   field="text" if it.source else f"items[{i}].text")
        check_mm_item(it, rules, n_images=n, item_field=None if it.source else f"items[{i}]",
                      text_name="text" if it.source else f"items[{i}].text",
                      has_video=isinstance(given, Visuals) and bool(given.video))
        frames = list(given.video) if isinstance(given, Visuals) else []
        for key, im in [("image", x) for x in ims] + [("video", x) for x in frames]:
            try:
                shape.check_size(*im.size)
            except InputError as e:
                raise InputError(e.reason, it.source, it.line,
                                 it.field if it.source else
                                 f"items[{i}].{key}",
                                 status=e.status) from None


def _image_list(given: Any) -> list[Image.Image]:
    """The images of one entry of an ``images`` argument (a video's frames not included)."""
    if isinstance(given, Visuals):
        return list(given.images)
    return list(given) if isinstance(given, (list, tuple)) else [given]


class EncodePipeline:
    """Batched, prefetching, length-grouped inference for an :class:`EmbeddingModel`.

    Args:
        model: the embedding model (any device; put it in eval mode or let :meth:`encode` do it).
        batch_size: items per forward.
        prefetch: batches prepared ahead of the forward (bounded memory: ``prefetch`` batches
            of pixels and ids wait at most). 0 prepares each batch in the calling thread.
        workers: threads decoding images for the batches in flight. Tokenisation and image
            processing of one adapter run one batch at a time (the tokenizer is not safe to
            call from several threads at once).
        group_by_length: sort items by :func:`length_order` before batching.
        progress: show a progress bar.
        desc: the progress bar's label.
        multivector: a :class:`fam.model.multivector.MultiVectorHead`: :meth:`encode_multi`
            then returns each item's token vectors too, from the same forward.
    """

    def __init__(self, model: EmbeddingModel, *, batch_size: int = 32, prefetch: int = 2,
                 workers: int = 1, group_by_length: bool = True, progress: bool = False,
                 desc: str = "encode", multivector: Any = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if prefetch < 0 or workers < 1:
            raise ValueError(f"prefetch must be >= 0 and workers >= 1, got {prefetch}, {workers}")
        self.model = model
        self.batch_size = batch_size
        self.prefetch = prefetch
        self.workers = workers
        self.group_by_length = group_by_length
        self.progress = progress
        self.desc = desc
        self.multivector = multivector
        self._tokens: list[torch.Tensor | None] | None = None
        self._encode_lock = threading.Lock()

    # ------------------------------------------------------------------ stages
    def _prepare(self, items: Sequence[MMItem], images: Sequence[ImageArg] | None,
                 pool: ThreadPoolExecutor | None) -> EncodedBatch:
        """Load the batch's images (in ``pool`` when given) and tokenise/pad/process it."""
        adapter = self.model.adapter

        def load(k: int) -> ImageArg:
            given = images[k] if images is not None else None
            return given if given is not None else adapter.load_item_image(items[k])

        if pool is not None and self.workers > 1:
            loaded = list(pool.map(load, range(len(items))))
        else:
            loaded = [load(k) for k in range(len(items))]
        with self._encode_lock:
            return adapter.encode(items, loaded)

    @torch.inference_mode()
    def _run(self, batch: EncodedBatch, idx: list[int]) -> torch.Tensor:
        """The batch's pooled vectors; with a multi-vector head and :meth:`encode_multi`
        running, also its token vectors (stored under the items' indices)."""
        device = self.model.adapter.device
        batch = batch.to(device)
        with autocast_for(device, self.model.adapter.dtype):
            out = self.model(batch, pooled_only=self._tokens is None)
            if self._tokens is not None:
                from fam.model.multivector import compact_tokens
                vecs, mask = self.multivector(out)
                for i, t in zip(idx, compact_tokens(vecs, mask)):
                    self._tokens[i] = t.float().cpu()
            return out.embedding.float().cpu()

    def encode_multi(self, items: Sequence[MMItem], images: Sequence[ImageArg] | None = None,
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Both readings of one forward: ``(pooled (n, d), [token vectors (n_i, D), ...])``.

        Needs the pipeline's ``multivector`` head; token vectors are float32 unit vectors on
        the CPU, in sequence order, only the positions the head counts.
        """
        if self.multivector is None:
            raise ValueError("encode_multi needs EncodePipeline(..., multivector=head)")
        self._tokens = [None] * len(items)
        try:
            pooled = self.encode(items, images)
            return pooled, list(self._tokens)
        finally:
            self._tokens = None

    # ------------------------------------------------------------------ public
    def encode(self, items: Sequence[MMItem], images: Sequence[ImageArg] | None = None,
               ) -> torch.Tensor:
        """Embed ``items``; row ``i`` of the result is item ``i``'s embedding.

        Args:
            items: the items (text with optional ``<|image_k|>`` placeholders, optional
                absolute image path).
            images: optional in-memory images aligned with ``items`` (an image, a list of
                images, or None to load ``item.image`` from disk).

        Returns:
            (n, d) float32 L2-normalised embeddings on the CPU.

        Raises:
            InputError: an item the input contract refuses (:func:`fam.data.items.check_item`:
                empty, a placeholder naming no image, a reserved control token), or an image
                that is missing, unreadable or outside the model's limits (names the data
                file, row and field).
        """
        n = len(items)
        if images is not None and len(images) != n:
            raise ValueError(f"images has {len(images)} entries for {n} items")
        check_encode_items(items, images, self.model.adapter.input_rules)
        d = self.model.adapter.hidden_size
        out = torch.empty(n, d, dtype=torch.float32)
        if n == 0:
            return out
        order = length_order(items, images) if self.group_by_length else list(range(n))
        chunks = [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]

        def sub(idx: list[int]) -> tuple[list[MMItem], list[ImageArg] | None]:
            return [items[i] for i in idx], (None if images is None else [images[i] for i in idx])

        was_training = self.model.training
        self.model.eval()
        bar = tqdm(total=n, desc=self.desc, unit="item", disable=not self.progress, leave=False)
        try:
            if self.prefetch == 0:
                for idx in chunks:
                    out[idx] = self._run(self._prepare(*sub(idx), None), idx)
                    bar.update(len(idx))
                return out
            # One thread prepares batches in order, ``prefetch`` ahead of the forward; a
            # second pool decodes images when workers > 1.
            img_pool = ThreadPoolExecutor(self.workers, thread_name_prefix="fam-img") \
                if self.workers > 1 else None
            prep = ThreadPoolExecutor(1, thread_name_prefix="fam-prep")
            pending: deque[tuple[list[int], Future]] = deque()
            try:
                it = iter(chunks)
                for idx in it:
                    pending.append((idx, prep.submit(self._prepare, *sub(idx), img_pool)))
                    if len(pending) >= self.prefetch:
                        break
                while pending:
                    idx, fut = pending.popleft()
                    batch = fut.result()  # re-raises a DataError from the thread
                    nxt = next(it, None)
                    if nxt is not None:
                        pending.append((nxt, prep.submit(self._prepare, *sub(nxt), img_pool)))
                    out[idx] = self._run(batch, idx)
                    bar.update(len(idx))
            finally:
                prep.shutdown(wait=True, cancel_futures=True)
                if img_pool is not None:
                    img_pool.shutdown(wait=True, cancel_futures=True)
            return out
        finally:
            bar.close()
            self.model.train(was_training)


def encode_items(model: EmbeddingModel, items: Sequence[MMItem], *, batch_size: int = 32,
                 images: Sequence[ImageArg] | None = None, progress: bool = False,
                 **kwargs: Any) -> torch.Tensor:
    """One-call form of :class:`EncodePipeline` (keyword arguments as its constructor)."""
    return EncodePipeline(model, batch_size=batch_size, progress=progress, **kwargs).encode(
        items, images)


@torch.no_grad()
def encode_sequential(model: EmbeddingModel, items: Sequence[MMItem],
                      batch_size: int = 32) -> torch.Tensor:
    """The plain reference loop (what ``EmbeddingModel.encode`` ran before the pipeline).

    Batches in input order; each batch is read, processed and then run, with the backbone
    returning every layer's hidden states. Used by parity tests and ``fam bench encode``.

    Returns:
        (n, d) float32 L2-normalised embeddings on the CPU.
    """
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    adapter = model.adapter
    device = adapter.device
    outs = []
    try:
        for i in range(0, len(items), batch_size):
            batch = adapter.encode(items[i:i + batch_size]).to(device)
            with autocast_for(device, adapter.dtype):
                hs = adapter.forward(batch, output_hidden_states=True).hidden_states
                last = hs[-1]
                emb = last[torch.arange(last.shape[0], device=last.device), batch.eos_index]
                if emb.dtype in (torch.float16, torch.bfloat16):
                    emb = emb.float()
                emb = F.normalize(emb, dim=-1) if model.normalize else emb
                outs.append(emb.float().cpu())
    finally:
        model.train(was_training)
    if not outs:
        return torch.zeros(0, adapter.hidden_size)
    return torch.cat(outs)
