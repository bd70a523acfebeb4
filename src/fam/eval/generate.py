"""Greedy generation from a generative LVLM: captions and answers to score.

The caption-quality metric (:mod:`fam.eval.captions`) and the SFT evaluation (VQA exact
match, REC box IoU, :mod:`fam.eval.rec`) score *generated* text. Prompts are written as
the generative stages train them (:func:`fam.train.stage0.build_generative_batch`):
``<image>\\n{prompt}`` followed by the target, so generation starts right after the
prompt (no trailing space: byte-level BPE fuses the space with the next word, ``Ġa``,
exactly as in training).

Batches are left-padded (every prompt ends at the last position, as ``generate`` needs)
and decoded greedily with transformers' ``generate``; the adapter's encoding appends an
EOS to every item, which is removed from the prompt here.

Example:
    >>> texts = generate(adapter, [(img_path, "Describe the image.")])  # doctest: +SKIP
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from fam.data.types import IMAGE_PLACEHOLDER, MMItem

log = logging.getLogger(__name__)

__all__ = ["encode_prompts", "generate"]


def encode_prompts(adapter, prompts: Sequence[tuple[Path | str, str]]) -> dict[str, torch.Tensor]:
    """Left-padded model inputs for ``(image, prompt)`` pairs, ending at the prompt.

    Returns:
        The model's input dict (``input_ids``, ``attention_mask``, ``pixel_values``, ...)
        with the trailing EOS removed from every row.
    """
    items = [MMItem(f"{IMAGE_PLACEHOLDER}\n{p}", Path(img)) for img, p in prompts]
    old = adapter.padding_side
    adapter.padding_side = "left"
    try:
        batch = adapter.encode(items)
    finally:
        adapter.padding_side = old
    ids = batch.inputs["input_ids"]
    length = ids.shape[1]
    if not bool((ids[:, -1] == adapter.eos_token_id).all()):
        raise RuntimeError("left-padded prompts must all end with the EOS the adapter appends")
    # drop the EOS column from every per-position tensor; image tensors keep their shape
    return {k: (v[:, :-1] if torch.is_tensor(v) and v.dim() >= 2 and v.shape[0] == ids.shape[0]
                and v.shape[1] == length else v) for k, v in batch.inputs.items()}


@torch.no_grad()
def generate(adapter, prompts: Sequence[tuple[Path | str, str]], max_new_tokens: int = 24,
             batch_size: int = 32) -> list[str]:
    """Greedy continuations of ``(image, prompt)`` pairs, decoded without special tokens.

    Args:
        adapter: a generative backbone adapter (LLaVA-style checkpoints).
        prompts: ``(image path, prompt text)`` pairs.
        max_new_tokens: generation length cap (an EOS ends a row earlier).
        batch_size: prompts per ``generate`` call.

    Returns:
        One stripped string per prompt.
    """
    model = adapter.hf_model
    was = model.training
    model.eval()
    out: list[str] = []
    try:
        for s in range(0, len(prompts), batch_size):
            inputs = encode_prompts(adapter, prompts[s:s + batch_size])
            inputs = {k: v.to(adapter.device) if torch.is_tensor(v) else v
                      for k, v in inputs.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(adapter.dtype)
            seq = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 num_beams=1, eos_token_id=adapter.eos_token_id,
                                 pad_token_id=adapter.pad_token_id)
            new = seq[:, inputs["input_ids"].shape[1]:]
            out += [t.strip() for t in adapter.tokenizer.batch_decode(
                new, skip_special_tokens=True)]
    finally:
        model.train(was)
    return out
