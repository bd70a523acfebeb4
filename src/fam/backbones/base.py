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

Prompt formats (``prompt_format``, see :mod:`fam.backbones.options` and ``docs/vlm2vec.md``):

- ``"fam"`` (default): the layout above, EOS appended and pooled, the family's own positions
  (Qwen2-VL: multimodal RoPE from ``mm_token_type_ids``).
- ``"vlm2vec"``: what VLM2Vec's v1 code feeds the same weights: each ``<|image_k|>`` becomes the
  family's bare image token (Qwen2-VL ``<|image_pad|>``, LLaVA-NeXT ``<image>``) expanded to the
  image's token count, the whole string goes through the tokenizer once (with the special
  tokens it adds itself, e.g. Llama's ``<s>``), **no EOS** is appended, the last real token is
  pooled, every real token gets the sequential position ``0..n-1`` (``position_ids``), no text
  is cut unless ``max_text_tokens`` says so, and transparency is dropped as transformers 4.46
  did. Phi-3.5-V keeps its processor's chunked layout, without EOS.

Every image passes :meth:`BackboneAdapter.prepare_image` first (optional pre-resize, then RGB).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from PIL import Image

from fam.backbones.batch import EncodedBatch, TokenGrid
from fam.backbones.checks import check_tokenizer
from fam.backbones.fastpath import checkpointing, dropout_active
from fam.backbones.inputs import InputLimits
from fam.backbones.layout import PromptLayout
from fam.backbones.options import (DEFAULT_MAX_TEXT_TOKENS, BackboneSettings,
                                   check_max_text_tokens, check_prompt_format,
                                   parse_image_resolution, pre_resize)
from fam.backbones.video import place_videos, split_visuals
from fam.data.images import load_image, to_rgb
from fam.data.types import MMItem
from fam.errors import ConfigError

log = logging.getLogger(__name__)

class BackboneAdapter(PromptLayout, InputLimits, torch.nn.Module):
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
        max_text_tokens: cap on text tokens per item (image tokens are never cut); ``None`` =
            no limit; ``"auto"`` = 128 for the ``"fam"`` format, no limit for ``"vlm2vec"``.
            Every cut is counted (``truncated_items``) and logged.
        padding_side: ``"right"`` or ``"left"``; masks are exact either way.
        prompt_format: ``"fam"`` or ``"vlm2vec"`` (module docstring).
        image_resolution: pre-resize of every image
            (:func:`fam.backbones.options.parse_image_resolution`).
    """

    family: ClassVar[str] = ""
    #: transformers ``model_type`` values this adapter serves.
    model_types: ClassVar[tuple[str, ...]] = ()
    #: The bare image token VLM2Vec writes for this family (``None``: no VLM2Vec counterpart).
    vlm2vec_image_token: ClassVar[str | None] = None
    #: Whether the processor has a min/max pixel budget (Qwen2-VL family).
    has_pixel_budget: ClassVar[bool] = False
    #: How an item's video reaches the model: ``"native"``, ``"frames"`` (several images) or
    #: ``None`` (refused); see :mod:`fam.backbones.video`.
    video_input: ClassVar[str | None] = "frames"
    #: The bare video token VLM2Vec-V2 writes (``prompt_format="vlm2vec"``, native video).
    vlm2vec_video_token: ClassVar[str | None] = None
    #: Family-specific keyword options of ``from_pretrained`` (beside the common ones).
    extra_load_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: torch.nn.Module, tokenizer: Any, image_processor: Any, *,
                 max_text_tokens: int | None | str = "auto", padding_side: str = "right",
                 prompt_format: str = "fam", image_resolution: Any = None):
        if padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("the adapter needs a fast tokenizer (offset mapping) for the "
                              "text-content mask; load it with use_fast=True")
        super().__init__()
        self.prompt_format = check_prompt_format(prompt_format)
        if self.prompt_format == "vlm2vec" and not self.supports_vlm2vec():
            raise ConfigError(
                f"prompt_format='vlm2vec': VLM2Vec has no {self.family} backbone (its v1 code "
                "supports qwen2_vl, qwen2_5_vl, llava_next and phi3_v); use prompt_format='fam'")
        self.image_resolution = parse_image_resolution(image_resolution)
        if isinstance(max_text_tokens, str) and max_text_tokens.strip().lower() == "auto":
            max_text_tokens = DEFAULT_MAX_TEXT_TOKENS[self.prompt_format]
        self.max_text_tokens = check_max_text_tokens(max_text_tokens)
        #: Items whose text ``max_text_tokens`` cut so far (each cut is logged).
        self.truncated_items = 0
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
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

    def pooled_token_modules(self) -> list[torch.nn.Module]:
        """The last decoder layer's token-wise modules (attention output projection, MLP),
        which an EOS-pooled forward needs at one token (:mod:`fam.backbones.fastpath`);
        ``[]`` when the layer does not have both, when gradient checkpointing would
        recompute the layer outside the forward, or when a dropout in the layer is active
        (fewer rows would draw other random masks)."""
        try:
            lm = self.language_model()
            layer = lm.layers[-1]
        except (AttributeError, IndexError, TypeError):
            return []
        if checkpointing(lm) or dropout_active(layer):
            return []
        mods = [getattr(getattr(layer, "self_attn", None), "o_proj", None),
                getattr(layer, "mlp", None)]
        return mods if all(isinstance(m, torch.nn.Module) for m in mods) else []

    #: Whether text-only batches may run their rows' shared leading tokens once
    #: (:mod:`fam.backbones.prefix`; needs plain ``0..n-1`` positions for text).
    shared_prefix_ok: ClassVar[bool] = False
    #: Leading dimensions of the language model's ``position_ids`` (3: multimodal RoPE).
    position_id_dims: ClassVar[int] = 0

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

    def image_token_grid(self, image: Image.Image) -> "TokenGrid | None":
        """The :class:`~fam.backbones.batch.TokenGrid` of one image's tokens (similarity
        maps), or None where the family's image tokens are not one plain grid (tiles)."""
        return None

    def video_block(self, n_tokens: int) -> tuple[list[int], list[bool]]:
        """Token ids of one video's block (``video_input == "native"`` families)."""
        raise NotImplementedError

    def process_videos(self, videos: Sequence[Sequence[Image.Image]]
                       ) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Video pixel inputs and the number of video tokens each video yields."""
        raise NotImplementedError

    def extra_inputs(self, input_ids: torch.Tensor, image_mask: torch.Tensor,
                     attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra model inputs the family needs beside ids, mask and pixels.

        The ``"vlm2vec"`` format passes explicit ``position_ids`` (B, L): ``0..n-1`` over each
        row's real tokens, 1 on padding (VLM2Vec's Qwen2-VL ``get_rope_index`` fills padding
        with ones; padding never influences real tokens).
        """
        if self.prompt_format == "vlm2vec":
            return {"position_ids": sequential_positions(attention_mask)}
        return {}

    @classmethod
    def supports_vlm2vec(cls) -> bool:
        """Whether VLM2Vec has a counterpart of this family (``prompt_format="vlm2vec"``)."""
        return cls.vlm2vec_image_token is not None

    @property
    def pixel_budget(self) -> tuple[int | None, int | None]:
        """The processor's (min_pixels, max_pixels) in effect; ``(None, None)`` without one."""
        return None, None

    @property
    def settings(self) -> BackboneSettings:
        """The input settings in effect (what ``fam_backbone.json`` records)."""
        lo, hi = self.pixel_budget
        return BackboneSettings(self.prompt_format, self.image_resolution, self.max_text_tokens,
                                lo, hi)

    def bos_ids(self) -> list[int]:
        """Tokens prepended to every sequence (e.g. Llama's ``<s>``)."""
        return []

    def processor_spec(self) -> dict[str, Any]:
        """How a stock transformers processor reproduces this adapter's layout (``fam export``).

        Returns:
            ``{"processor_class": name, "processor_config": {...}, "image_placeholder": text,
            "named_tokens": {attribute: token}}``: a processor class that loads without
            torchvision, the extra fields of its ``processor_config.json``, the text a chat
            template writes for one image (the processor expands it into this adapter's image
            block) and tokenizer attributes the processor reads (e.g. ``image_token``).

        Raises:
            ConfigError: the family has no exportable processor yet.
        """
        raise ConfigError(f"fam export does not support the {self.family} family yet "
                          "(supported: qwen2_vl, qwen2_5_vl, llava, llava_next)")

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
        from fam.backbones.headless import embedding_only_requested, load_headless
        if embedding_only_requested():
            # fam.model.encode.load_embedding_model: the LM head is never read nor kept.
            return load_headless(path, **kw)
        return cls._model_class().from_pretrained(str(path), **kw)

    @classmethod
    def load_components(cls, path: str | Path, **kwargs: Any) -> tuple[Any, Any, Any]:
        """Load (model, tokenizer, image_processor) from a hub id or a local directory."""
        raise NotImplementedError

    # ------------------------------------------------------------------ loading/saving
    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | str | None = None,
                        attn_implementation: str | None = None,
                        max_text_tokens: int | None | str = "auto", padding_side: str = "right",
                        prompt_format: str = "fam", image_resolution: Any = None,
                        **kwargs: Any) -> "BackboneAdapter":
        """Load a checkpoint (hub id or local ``save_pretrained`` directory).

        ``kwargs`` are the family's own loading options (:attr:`extra_load_options`); prefer
        :func:`fam.backbones.load_backbone`, which validates every option and applies the
        settings a saved model records.
        """
        model, tok, proc = cls.load_components(path, dtype=dtype,
                                               attn_implementation=attn_implementation, **kwargs)
        check_tokenizer(tok, path)  # missing files give an empty tokenizer, not an error
        return cls(model, tok, proc, max_text_tokens=max_text_tokens, padding_side=padding_side,
                   prompt_format=prompt_format, image_resolution=image_resolution)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Save model, tokenizer and image processor as a normal checkpoint directory.

        The input settings (prompt format, pre-resize, pixel budget, text cap) go to
        ``fam_backbone.json`` beside them, so the model is later loaded, evaluated and
        exported with the inputs it was trained on. Written into a temporary sibling directory
        first and renamed into place, so a crash never leaves a half-written checkpoint under
        ``out_dir``.
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
            self.settings.save(tmp, self.family)
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
    def prepare_image(self, image: Image.Image) -> Image.Image:
        """What every image goes through before the processor: pre-resize, then RGB.

        The pre-resize (``image_resolution``) happens in the image's own mode, as VLM2Vec
        resizes the opened file before its processor converts it. RGB conversion follows the
        processor of each format: ``"fam"`` composites transparency onto white (transformers 5
        image processors, which fam runs), ``"vlm2vec"`` drops the alpha channel (transformers
        4.46, which VLM2Vec pins, used ``Image.convert("RGB")``).
        """
        image = pre_resize(image, self.image_resolution)
        return to_rgb(image, "drop" if self.prompt_format == "vlm2vec" else "composite")

    def load_item_image(self, item: MMItem) -> Image.Image | None:
        """The item's image(s) as stored on disk (normalised mode; :meth:`prepare_image`
        converts), checked against this model's :attr:`input_rules`: one image, a list
        (``image`` then ``images``) or ``None``."""
        ims = [load_image(p, source=item.source, line=item.line, field=item.field, rgb=False,
                          rules=self.input_rules.images) for p in item.all_images]
        return None if not ims else ims[0] if len(ims) == 1 else ims

    def encode(self, items: Sequence[MMItem],
               images: Sequence[Image.Image | Sequence[Image.Image] | None] | None = None,
               ) -> EncodedBatch:
        """Tokenise and pad a batch of items; load and process their images.

        Args:
            items: the batch. ``item.image`` is an absolute path (or ``None``).
            images: optional already-loaded images aligned with ``items`` (skips disk reads).
                An entry may also be a list of images: the item's text then refers to them as
                ``<|image_1|>``, ``<|image_2|>``, ... (images it does not mention go first),
                or a :class:`fam.data.types.Visuals` (images and a video's frames).

        Returns:
            An :class:`EncodedBatch` on the CPU.
        """
        if len(items) == 0:
            raise ValueError("encode() needs at least one item")
        if images is None:
            images = [self.load_item_image(it) for it in items]
        per_item, given = split_visuals(images)
        # A video becomes one more visual slot (native) or that many images (fam.backbones.video).
        items, per_item, slots, videos = place_videos(self, items, per_item, given=given)
        # Images go to the processor in the order their blocks appear in the batch (the models
        # scatter features into image positions in that order), e.g. "<|image_2|> ... <|image_1|>".
        orders = [[k for k in self.image_order(it, len(ims) + (slot is not None)) if k != slot]
                  if len(ims) + (slot is not None) > 1 else list(range(1, len(ims) + 1))
                  for it, ims, slot in zip(items, per_item, slots)]
        present = [self.prepare_image(ims[k - 1]) for ims, order in zip(per_item, orders)
                   for k in order]
        pix: dict[str, torch.Tensor] = {}
        counts: list[int] = []
        if present:
            pix, counts = self.process_images(present)
        video_counts: list[int] = []
        if videos:
            vpix, video_counts = self.process_videos(
                [[self.prepare_image(f) for f in frames] for frames in videos])
            pix.update(vpix)
        count_iter, video_iter = iter(counts), iter(video_counts)
        seqs = []
        for it, order, slot in zip(items, orders, slots):
            by_index = {k: next(count_iter) for k in order}
            if slot is not None:
                by_index[slot] = next(video_iter)
            n = [by_index[k] for k in sorted(by_index)]
            # One image keeps the scalar form of the contract.
            seqs.append(self._build_sequence(it, n[0] if len(n) == 1 else (n or None), slot))
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
        inputs.update(self.extra_inputs(input_ids, img_mask, attn))
        counts_t = torch.tensor([[len(ims), int(slot is not None)]
                                 for ims, slot in zip(per_item, slots)], dtype=torch.long)
        return EncodedBatch(inputs, img_mask, txt_mask, eos, counts_t.sum(1) > 0, counts_t)

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


def sequential_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) positions ``0..n-1`` over each row's real tokens and 1 on padding.

    What VLM2Vec's forward gives every token (image tokens included) under either padding side.
    """
    attn = attention_mask.long()
    return (attn.cumsum(-1) - 1).masked_fill(attn == 0, 1)
