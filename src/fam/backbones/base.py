"""The backbone adapter contract.

An adapter wraps one generative vision-language model (a transformers ``*ForConditionalGeneration``)
and is the ONLY code that knows its processor, special tokens and chat layout. Everything
downstream (embedding model, losses, trainers, analysis) receives tensors and masks:

- ``image_mask`` (B, L): positions holding image tokens, found as
  ``input_ids == config.image_token_id`` (never a hard-coded id);
- ``text_mask`` (B, L): tokens of the text *content* (method.md §1): not the image block, not
  special tokens, not padding and, when the item says where its content is
  (:attr:`MMItem.content`), not the instruction either;
- ``eos_index`` (B,): the last real token, whose final-layer state is the embedding.

The sequence for one item is built token by token (not by string templating), which is what
makes the masks exact under both left and right padding:

    [bos?] <text before placeholder> <image block> <text after placeholder> <eos>

Several images per item: pass a list of images for the item to :meth:`BackboneAdapter.encode`
and write ``<|image_1|>``, ``<|image_2|>``, ... in its text (each image's block goes where its
tag is; untagged images go first; tags without an image are dropped). Images reach the model in
the order their blocks appear, which is the order every family scatters features in.

Families differ only in the image block (e.g. Qwen2-VL: ``<|vision_start|>`` + N×``<|image_pad|>``
+ ``<|vision_end|>``; LLaVA: N×``<image>``), in how images become pixel tensors and in extra model
inputs; subclasses implement exactly those hooks.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from PIL import Image

from fam.data.images import load_image
from fam.data.types import MMItem
from fam.errors import ConfigError

log = logging.getLogger(__name__)

#: ``<|image_k|>``: MMEB's placeholder generalised to the k-th image of an item (1-based).
_PLACEHOLDER_RE = re.compile(r"<\|image_(\d+)\|>")


def _placeholder(k: int) -> str:
    return f"<|image_{k}|>"


@dataclass
class EncodedBatch:
    """A tokenised, padded batch ready for the backbone.

    Attributes:
        inputs: keyword arguments for the model's forward (``input_ids`` (B, L),
            ``attention_mask`` (B, L), and the family's pixel inputs).
        image_mask: (B, L) bool, image-token positions.
        text_mask: (B, L) bool, text-content positions.
        eos_index: (B,) long, position of the last real token (the pooled token).
        has_image: (B,) bool, whether the item carries an image.
    """

    inputs: dict[str, torch.Tensor]
    image_mask: torch.Tensor
    text_mask: torch.Tensor
    eos_index: torch.Tensor
    has_image: torch.Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "EncodedBatch":
        """Move every tensor to ``device``; floating pixel inputs also to ``dtype`` if given."""
        def mv(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device)
        return EncodedBatch({k: mv(v) for k, v in self.inputs.items()}, self.image_mask.to(device),
                            self.text_mask.to(device), self.eos_index.to(device),
                            self.has_image.to(device))

    @property
    def batch_size(self) -> int:
        return int(self.eos_index.shape[0])


@dataclass
class _Seq:
    ids: list[int]
    image: list[bool]
    text: list[bool]
    n_image_tokens: int = 0
    extra: dict[str, list[int]] = field(default_factory=dict)


class BackboneAdapter(torch.nn.Module):
    """Base class of the per-family adapters.

    The adapter is a module whose only child is the transformers model (``self.model``),
    so whoever holds the adapter (the embedding model, a training module) reaches the
    model's parameters through it, and replacing ``self.model`` (a LoRA wrap or merge) is
    seen by every holder: the model is held in exactly one place.

    Args:
        model: the transformers generative model (``*ForConditionalGeneration``), possibly
            wrapped by peft.
        tokenizer: a fast tokenizer (offsets are needed for the content mask).
        image_processor: the family's image processor (``*ImageProcessorPil`` classes work
            without torchvision).
        max_text_tokens: cap on text tokens per item (the image block is never cut).
        padding_side: ``"right"`` or ``"left"``; masks are exact either way.
    """

    family: ClassVar[str] = ""
    #: transformers ``model_type`` values this adapter serves.
    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: torch.nn.Module, tokenizer: Any, image_processor: Any, *,
                 max_text_tokens: int = 128, padding_side: str = "right"):
        if padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("the adapter needs a fast tokenizer (offset mapping) for the "
                              "text-content mask; load it with use_fast=True")
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_text_tokens = max_text_tokens
        self.padding_side = padding_side
        self.image_token_id: int = self._resolve_image_token_id()
        self.pad_token_id: int = self._resolve_pad_id()
        self.eos_token_id: int = self._resolve_eos_id()
        self._special_ids = set(int(i) for i in getattr(tokenizer, "all_special_ids", []))

    # ------------------------------------------------------------------ model access
    @property
    def hf_model(self) -> torch.nn.Module:
        """The underlying transformers model (unwrapped from peft if needed)."""
        m = self.model
        if hasattr(m, "get_base_model"):
            m = m.get_base_model()
        return m

    @property
    def config(self) -> Any:
        return self.hf_model.config

    @property
    def text_config(self) -> Any:
        return self.config.get_text_config()

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def num_layers(self) -> int:
        """Number of language-model layers (hidden_states has ``num_layers + 1`` entries)."""
        return int(self.text_config.num_hidden_layers)

    def input_embeddings(self) -> torch.nn.Embedding:
        """The language model's input embedding table (V, d)."""
        return self.hf_model.get_input_embeddings()

    def language_model(self) -> torch.nn.Module:
        return self.hf_model.model.language_model

    #: Substrings of parameter names that belong to the vision tower (frozen by default
    #: when the language model is fully fine-tuned).
    vision_param_keys: ClassVar[tuple[str, ...]] = ("visual.", "vision_tower.", "vision_model.")

    def is_vision_param(self, name: str) -> bool:
        """Whether parameter ``name`` belongs to the vision tower."""
        return any(k in name for k in self.vision_param_keys)

    def lora_target_modules(self) -> str:
        """A peft ``target_modules`` regex selecting the language model's linear layers only."""
        return r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ------------------------------------------------------------------ family hooks
    def image_block(self, n_tokens: int) -> tuple[list[int], list[bool]]:
        """Token ids of one image's block and which of them are image tokens."""
        raise NotImplementedError

    def image_block_at(self, n_tokens: int, image_index: int) -> tuple[list[int], list[bool]]:
        """The block of the ``image_index``-th image of an item (1-based, as in ``<|image_k|>``).

        Only families whose ids depend on the image's position (Phi-3.5-V: ``-k``) override it.
        """
        return self.image_block(n_tokens)

    def process_images(self, images: Sequence[Image.Image]) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Pixel inputs for the model and the number of image tokens each image yields."""
        raise NotImplementedError

    def extra_inputs(self, input_ids: torch.Tensor, image_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra model inputs the family needs beside ids, mask and pixels."""
        return {}

    def bos_ids(self) -> list[int]:
        """Tokens prepended to every sequence (e.g. Llama's ``<s>``)."""
        return []

    @classmethod
    def build_tiny(cls, out_dir: str | Path | None = None, **kwargs: Any) -> "BackboneAdapter":
        raise NotImplementedError

    @classmethod
    def _load_model(cls, path: str | Path, dtype: Any = None,
                    attn_implementation: str | None = None) -> torch.nn.Module:
        """``cls._model_class().from_pretrained`` with the optional dtype / attention kernel."""
        kw: dict[str, Any] = {}
        if dtype is not None:
            kw["dtype"] = dtype
        if attn_implementation is not None:
            kw["attn_implementation"] = attn_implementation
        return cls._model_class().from_pretrained(str(path), **kw)

    @classmethod
    def load_components(cls, path: str | Path, **kwargs: Any) -> tuple[Any, Any, Any]:
        """Load (model, tokenizer, image_processor) from a hub id or a local directory."""
        raise NotImplementedError

    # ------------------------------------------------------------------ loading/saving
    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | str | None = None,
                        attn_implementation: str | None = None, max_text_tokens: int = 128,
                        padding_side: str = "right", **kwargs: Any) -> "BackboneAdapter":
        """Load a checkpoint (hub id or local ``save_pretrained`` directory)."""
        model, tok, proc = cls.load_components(path, dtype=dtype,
                                               attn_implementation=attn_implementation, **kwargs)
        return cls(model, tok, proc, max_text_tokens=max_text_tokens, padding_side=padding_side)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Save model, tokenizer and image processor as a normal checkpoint directory.

        Written into a temporary sibling directory first and renamed into place, so a crash
        never leaves a half-written checkpoint under ``out_dir``.
        """
        from fam.utils.checkpoint import atomic_dir

        with atomic_dir(out_dir) as tmp:
            model = self.model
            if hasattr(model, "peft_config"):
                raise ConfigError("save_pretrained on a peft-wrapped model would save only the "
                                  "adapter; merge it first (fam.model.merge_lora) or save the "
                                  "adapter with model.save_pretrained")
            model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            self.image_processor.save_pretrained(tmp)
        return Path(out_dir)

    def _resolve_image_token_id(self) -> int:
        """The id marking image tokens in ``input_ids``: ``config.image_token_id``."""
        return int(self.config.image_token_id)

    def _resolve_pad_id(self) -> int:
        tok = self.tokenizer
        if tok.pad_token_id is not None:
            return int(tok.pad_token_id)
        if tok.eos_token_id is not None:
            return int(tok.eos_token_id)
        return 0

    def _resolve_eos_id(self) -> int:
        tok = self.tokenizer
        if tok.eos_token_id is None:
            raise ConfigError("the tokenizer has no eos_token; EOS pooling needs one")
        return int(tok.eos_token_id)

    # ------------------------------------------------------------------ batching
    def _tokenize_segment(self, text: str, offset: int, content: tuple[int, int] | None,
                          ) -> tuple[list[int], list[bool]]:
        if not text:
            return [], []
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        is_text = []
        for tid, (s, e) in zip(ids, enc["offset_mapping"]):
            s, e = s + offset, e + offset
            inside = content is None or (s < content[1] and e > content[0])
            is_text.append(inside and tid not in self._special_ids and e > s)
        return ids, is_text

    def _place_images(self, item: MMItem, n_images: int) -> tuple[str, tuple[int, int] | None]:
        """The item's text with exactly one ``<|image_k|>`` per image, and its content span.

        Placeholders without an image (text-only side of a row, or ``<|image_k|>`` with k above
        the image count) and repeats of an already placed image are dropped; images the text
        does not mention go first (MMEB convention), each followed by a newline.
        """
        text, content = item.text, item.content

        def drop(t: str, c, pos: int, length: int):
            c = tuple(x - length if x > pos else x for x in c) if c is not None else None
            return t[:pos] + t[pos + length:], c

        def first_stale(t: str):
            seen: set[int] = set()
            for m in _PLACEHOLDER_RE.finditer(t):
                k = int(m.group(1))
                if not 1 <= k <= n_images or k in seen:
                    return m
                seen.add(k)
            return None

        while (stale := first_stale(text)) is not None:
            text, content = drop(text, content, stale.start(), stale.end() - stale.start())
        # MMEB convention: an image without a placeholder goes first.
        referenced = {int(m.group(1)) for m in _PLACEHOLDER_RE.finditer(text)}
        prefix = "".join(_placeholder(k) + "\n" for k in range(1, n_images + 1)
                         if k not in referenced)
        if prefix:
            text = prefix + text
            if content is not None:
                content = (content[0] + len(prefix), content[1] + len(prefix))
        return text, content

    def image_order(self, item: MMItem, n_images: int) -> list[int]:
        """1-based indices of the item's images in the order their blocks appear.

        Models fill image positions with image features in the order the images are given,
        so :meth:`encode` processes each item's images in this order.
        """
        text, _ = self._place_images(item, n_images)
        return [int(m.group(1)) for m in _PLACEHOLDER_RE.finditer(text)]

    def _build_sequence(self, item: MMItem, n_image_tokens: int | Sequence[int] | None) -> _Seq:
        """Token ids and masks of one item.

        ``n_image_tokens`` is the token count of the item's image, or a list of counts when the
        item carries several images (``<|image_1|>``, ``<|image_2|>``, ... in the text), or
        ``None`` without an image.
        """
        if n_image_tokens is None:
            counts: list[int] = []
        elif isinstance(n_image_tokens, (list, tuple)):
            counts = list(n_image_tokens)
        else:
            counts = [n_image_tokens]
        text, content = self._place_images(item, len(counts))
        # Segments of text between image blocks, with their character offsets in ``text``.
        segments: list[tuple[str, int]] = []
        blocks: list[int] = []
        pos = 0
        for m in _PLACEHOLDER_RE.finditer(text):
            segments.append((text[pos:m.start()], pos))
            blocks.append(int(m.group(1)))
            pos = m.end()
        segments.append((text[pos:], pos))
        budget = self.max_text_tokens
        toks: list[tuple[list[int], list[bool]]] = []
        for seg, off in segments:
            ids_, txt_ = self._tokenize_segment(seg, off, content)
            # Cut the end of the text (image blocks and the EOS token are never cut).
            toks.append((ids_[:budget], txt_[:budget]))
            budget = max(0, budget - len(ids_))
        bos = self.bos_ids()
        ids = list(bos)
        img = [False] * len(ids)
        txt = [False] * len(ids)
        for i, (s_ids, s_txt) in enumerate(toks):
            ids += s_ids
            img += [False] * len(s_ids)
            txt += s_txt
            if i < len(blocks):
                k = blocks[i]
                blk_ids, blk_img = self.image_block_at(counts[k - 1], k)
                ids += blk_ids
                img += blk_img
                txt += [False] * len(blk_ids)
        ids += [self.eos_token_id]
        img += [False]
        txt += [False]
        return _Seq(ids, img, txt, sum(int(c) for c in counts))

    def load_item_image(self, item: MMItem) -> Image.Image | None:
        if item.image is None:
            return None
        return load_image(item.image, source=item.source, line=item.line, field=item.field)

    def encode(self, items: Sequence[MMItem],
               images: Sequence[Image.Image | Sequence[Image.Image] | None] | None = None,
               ) -> EncodedBatch:
        """Tokenise and pad a batch of items; load and process their images.

        Args:
            items: the batch. ``item.image`` is an absolute path (or ``None``).
            images: optional already-loaded images aligned with ``items`` (skips disk reads).
                An entry may also be a list of images: the item's text then refers to them as
                ``<|image_1|>``, ``<|image_2|>``, ... (images it does not mention go first).

        Returns:
            An :class:`EncodedBatch` on the CPU.
        """
        if len(items) == 0:
            raise ValueError("encode() needs at least one item")
        if images is None:
            images = [self.load_item_image(it) for it in items]
        per_item: list[list[Image.Image]] = [
            [] if im is None else list(im) if isinstance(im, (list, tuple)) else [im]
            for im in images]
        # Images go to the processor in the order their blocks appear in the batch (the models
        # scatter features into image positions in that order), e.g. "<|image_2|> ... <|image_1|>".
        orders = [self.image_order(it, len(ims)) if len(ims) > 1 else list(range(1, len(ims) + 1))
                  for it, ims in zip(items, per_item)]
        present = [ims[k - 1] for ims, order in zip(per_item, orders) for k in order]
        pix: dict[str, torch.Tensor] = {}
        counts: list[int] = []
        if present:
            pix, counts = self.process_images(present)
        count_iter = iter(counts)
        seqs = []
        for it, order in zip(items, orders):
            by_index = {k: next(count_iter) for k in order}
            n = [by_index[k] for k in sorted(by_index)]
            # One image keeps the scalar form of the contract.
            seqs.append(self._build_sequence(it, n[0] if len(n) == 1 else (n or None)))
        L = max(len(s.ids) for s in seqs)
        B = len(seqs)
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        img_mask = torch.zeros((B, L), dtype=torch.bool)
        txt_mask = torch.zeros((B, L), dtype=torch.bool)
        eos = torch.zeros(B, dtype=torch.long)
        for b, s in enumerate(seqs):
            n = len(s.ids)
            start = L - n if self.padding_side == "left" else 0
            sl = slice(start, start + n)
            input_ids[b, sl] = torch.tensor(s.ids)
            attn[b, sl] = 1
            img_mask[b, sl] = torch.tensor(s.image)
            txt_mask[b, sl] = torch.tensor(s.text)
            eos[b] = start + n - 1
        inputs = {"input_ids": input_ids, "attention_mask": attn, **pix}
        inputs.update(self.extra_inputs(input_ids, img_mask))
        has_image = torch.tensor([len(ims) > 0 for ims in per_item], dtype=torch.bool)
        return EncodedBatch(inputs, img_mask, txt_mask, eos, has_image)

    # ------------------------------------------------------------------ forward
    def forward(self, batch: EncodedBatch, *, output_hidden_states: bool = True,
                output_attentions: bool = False) -> Any:
        """Run the backbone's base model (no LM head: embeddings need no logits).

        Returns the transformers output with ``last_hidden_state`` (B, L, d) and, when asked,
        ``hidden_states`` (num_layers + 1 tensors of (B, L, d)) and ``attentions``.
        """
        base = self.model
        if hasattr(base, "get_base_model"):
            # Call through peft's wrapper's base so LoRA layers (injected in place) are used.
            base = base.get_base_model()
        return base.model(**batch.inputs, output_hidden_states=output_hidden_states,
                          output_attentions=output_attentions, use_cache=False, return_dict=True)

    def generative_loss(self, batch: EncodedBatch, labels: torch.Tensor) -> torch.Tensor:
        """Next-token loss of the full generative model (stage 0 / caption loss).

        Args:
            labels: (B, L) token ids to predict, ``-100`` where no loss is taken.
        """
        out = self.model(**batch.inputs, labels=labels, use_cache=False, return_dict=True)
        return out.loss
