"""Phi-3.5-Vision adapter (remote code only; FAM's second backbone, method.md §1).

Phi-3.5-V has no native transformers class: ``microsoft/Phi-3.5-vision-instruct`` ships
``modeling_phi3_v.py``/``processing_phi3_v.py``/``image_processing_phi3_v.py`` and runs
only with ``trust_remote_code=True``. Running code downloaded from the hub is a decision the
user makes, so this adapter is opt-in::

    load_backbone("microsoft/Phi-3.5-vision-instruct", trust_remote_code=True)

Layout (``Phi3VProcessor._convert_images_texts_to_inputs``): the text is split at each
``<|image_k|>``; every chunk is tokenised **with** the tokenizer's special tokens (so each
chunk, also the one after an image, starts with ``<s>``); image ``k`` becomes
``num_img_tokens[k-1]`` copies of the NEGATIVE id ``-k``. The model's
``Phi3ImageEmbedding`` finds image positions as ``input_ids < 0`` and fills them, image
after image in batch order, with the HD-transform features of ``pixel_values``
(n_images, 1 + max_crops, 3, 336, 336) and ``image_sizes`` (n_images, 2). Here:
``[<s>] text-before [-k]×N [<s>] text-after </eos>``, ``image_mask = input_ids < 0``.

What is verified offline (tests, with a fake processor/model standing in): the token layout
and its masks under left/right padding, several images per item, the opt-in error, the LoRA
target regex against Phi-3.5-V's module names, and that EOS pooling is padding-invariant
given a model that consumes negative ids the way ``Phi3ImageEmbedding`` does.
**Untested here** (no remote code offline): loading the real checkpoint, the real
``Phi3VImageProcessor`` outputs (``num_img_tokens`` is taken from it, never recomputed), and
whether the remote code still runs under transformers 5.x (it was written for 4.4x; expect
to pin or patch it on a GPU machine).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from fam.backbones.base import BackboneAdapter
from fam.errors import ConfigError

log = logging.getLogger(__name__)

#: The image id of ``<|image_1|>`` (Phi3VProcessor writes ``-k`` for the k-th image).
FIRST_IMAGE_ID = -1


def remote_code_error(path: str | Path) -> ConfigError:
    return ConfigError(
        f"{path} is a Phi-3.5-V checkpoint (model_type 'phi3_v'), which exists only as remote "
        "code shipped with the checkpoint. Loading it executes that code; opt in explicitly "
        f"with load_backbone({str(path)!r}, trust_remote_code=True) (or "
        "Phi3VAdapter.from_pretrained(..., trust_remote_code=True)).")


class Phi3VAdapter(BackboneAdapter):
    """Adapter for the remote-code ``Phi3VForCausalLM`` (model_type ``phi3_v``).

    Args:
        model: the remote-code model (``AutoModelForCausalLM`` with ``trust_remote_code``).
        tokenizer: its fast Llama tokenizer.
        image_processor: its ``Phi3VImageProcessor`` (returns ``pixel_values``,
            ``image_sizes`` and ``num_img_tokens``).
    """

    family = "phi3_v"
    model_types = ("phi3_v",)
    #: Loading runs code from the checkpoint: :func:`fam.backbones.load_backbone` asks for
    #: ``trust_remote_code=True``.
    requires_remote_code = True
    extra_load_options = ("num_crops",)

    def __init__(self, model, tokenizer, image_processor, **kwargs: Any):
        super().__init__(model, tokenizer, image_processor, **kwargs)
        # Phi3VProcessor tokenises every chunk with special tokens: whatever the tokenizer adds
        # to an empty string (``<s>`` for Phi-3.5-V) starts each chunk, also after an image.
        self._chunk_prefix = [int(i) for i in tokenizer("", add_special_tokens=True)["input_ids"]
                              if int(i) != self.eos_token_id]
        if self.prompt_format == "vlm2vec" and self.image_resolution is not None:
            log.warning("VLM2Vec never pre-resizes Phi-3.5-V images (its dataset skips PHI3V); "
                        "image_resolution=%s is applied anyway, as asked", self.image_resolution)

    def _resolve_image_token_id(self) -> int:
        # No image_token_id in the config: image k is written as -k (the first image: -1).
        return FIRST_IMAGE_ID

    @classmethod
    def supports_vlm2vec(cls) -> bool:
        # VLM2Vec-Full is Phi-3.5-V; its processor writes the layout below, minus the EOS.
        return True

    def _build_vlm2vec_sequence(self, item, counts, video_slot=None):
        # Phi3VProcessor (VLM2Vec's copy, processing_phi3_v.py) tokenises each chunk between
        # image tags with the tokenizer's own specials and appends nothing: fam's chunked
        # layout without the EOS. A text-only item is one chunk, the same thing.
        return self._build_fam_sequence(item, counts, append_eos=False, video_slot=video_slot)

    # ------------------------------------------------------------------ model access
    def language_model(self) -> torch.nn.Module:
        """``model.model`` (``Phi3VModel``): the decoder; note it also holds ``vision_embed_tokens``."""
        return self.hf_model.model

    def lora_target_modules(self) -> str:
        # Phi-3 fuses q/k/v and gate/up; the CLIP tower (vision_embed_tokens.img_processor) has
        # its own q/k/v/out projections, so the regex anchors on the decoder's "model.layers".
        return r"(.*\.)?model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))$"

    # ------------------------------------------------------------------ layout
    def bos_ids(self) -> list[int]:
        return list(self._chunk_prefix)

    def image_block(self, n_tokens: int) -> tuple[list[int], list[bool]]:
        return self.image_block_at(n_tokens, 1)

    def image_block_at(self, n_tokens: int, image_index: int) -> tuple[list[int], list[bool]]:
        # The chunk after the image starts with the tokenizer's prefix (<s>), as in Phi3VProcessor.
        ids = [-int(image_index)] * int(n_tokens) + self._chunk_prefix
        return ids, [True] * int(n_tokens) + [False] * len(self._chunk_prefix)

    def process_images(self, images: Sequence[Image.Image]) -> tuple[dict[str, torch.Tensor], list[int]]:
        out = self.image_processor(list(images), return_tensors="pt")
        n = out["num_img_tokens"]
        counts = [int(c) for c in (n.tolist() if torch.is_tensor(n) else n)]
        return {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}, counts

    def encode(self, items, images=None):
        batch = super().encode(items, images)
        # Every image of every item is negative; the mask the base built must agree (guards
        # the contract downstream code relies on: image_mask == input_ids < 0).
        assert torch.equal(batch.image_mask, batch.inputs["input_ids"] < 0)
        return batch

    # ------------------------------------------------------------------ loading
    @classmethod
    def load_components(cls, path: str | Path, *, dtype=None, attn_implementation=None,
                        trust_remote_code: bool = False, num_crops: int = 4):
        """Load the remote-code model, tokenizer and image processor.

        Args:
            trust_remote_code: must be ``True`` (the checkpoint's code is executed).
            num_crops: HD-transform crops of the image processor (VLM2Vec trains with 4;
                the checkpoint default is 4 for multi-image, 16 for single image).
        """
        if not trust_remote_code:
            raise remote_code_error(path)
        from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer
        model_kw: dict[str, Any] = {"trust_remote_code": True}
        if dtype is not None:
            model_kw["torch_dtype"] = dtype
        if attn_implementation is not None:
            model_kw["_attn_implementation"] = attn_implementation
        log.warning("loading %s with trust_remote_code=True: its Python code runs locally", path)
        model = AutoModelForCausalLM.from_pretrained(str(path), **model_kw)
        tok = AutoTokenizer.from_pretrained(str(path), use_fast=True)
        proc = AutoImageProcessor.from_pretrained(str(path), trust_remote_code=True,
                                                  num_crops=num_crops)
        return model, tok, proc

    @classmethod
    def build_tiny(cls, out_dir: str | Path | None = None, **kwargs: Any) -> "Phi3VAdapter":
        raise ConfigError("Phi-3.5-V has no native transformers class, so no tiny model can be "
                          "built offline; use the real checkpoint with trust_remote_code=True")
