"""An offline byte-level BPE tokenizer for the tiny presets.

Real checkpoints bring their own tokenizer. The tiny, random-initialised models that run
offline need one too; a byte-level BPE trains from a few thousand sentences in well under a
second with the ``tokenizers`` library, covers any input text (bytes are the fallback) and
carries the family's special tokens so the model code sees the same ids it would with a
real vocabulary.
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

#: Words and phrases the built-in benchmark and the MMEB instructions use, so the default
#: vocabulary merges them into few tokens. Any other text still tokenises (byte fallback).
DEFAULT_CORPUS: tuple[str, ...] = (
    "Represent the given image.",
    "Represent the given image for classification.",
    "Represent the given image with the following question:",
    "Represent the given cropped image of the object.",
    "Represent the given text.",
    "Find me an everyday image that matches the given caption:",
    "Find a caption for the given image.",
    "Select the portion of the image that isolates the object labeled as",
    "Select the portion of the image that follows the language expressions.",
    "a red green blue yellow purple orange cyan magenta pink brown white black gray",
    "circle square triangle star cross diamond heart hexagon ring pentagon",
    "small large big tiny medium left right above below of the and with next to",
    "what colour is the what shape is the how many objects are there",
    "one two three four five six seven eight nine ten zero",
    "What is left of the What is right of the What is above the What is below the",
    "a photo of an image showing there is are objects object scene picture",
)


def train_bpe_tokenizer(corpus: Iterable[str], special_tokens: list[str], vocab_size: int = 1024,
                        ) -> Tokenizer:
    """Train a byte-level BPE tokenizer.

    Args:
        corpus: training sentences (deterministic order gives a deterministic vocabulary).
        special_tokens: added first, so they get ids ``0..len-1`` in the given order.
        vocab_size: target vocabulary size (special tokens and the 256 bytes included).

    Returns:
        A ``tokenizers.Tokenizer``; wrap it with ``PreTrainedTokenizerFast``.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(corpus) + list(DEFAULT_CORPUS), trainer)
    return tok
