"""Tiny random Grounding DINO and SAM checkpoints for the PAD tests (offline, seconds).

Test helpers, not library code: the real loading path (:class:`fam.pad.HFGroundingDinoDetector`,
:class:`fam.pad.HFSamSegmenter`) reads these folders like hub checkpoints.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import torch

_WORD = re.compile(r"[a-z][a-z\-']*")


def _dedup(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


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
