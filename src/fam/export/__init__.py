"""Export a fam model for the tools people deploy with (``fam export``).

:func:`export_sentence_transformers` writes a folder that ``sentence_transformers.
SentenceTransformer(DIR)`` loads without remote code and vLLM serves with its pooling runner;
see :mod:`fam.export.st` for what is in it and :mod:`fam.export.card` for its model card.
:func:`export_multivector` (``--format multivector``) writes sentence-transformers'
``MultiVectorEncoder`` folder (late interaction, :mod:`fam.export.multivector`).
"""
from fam.export.multivector import export_multivector
from fam.export.st import (DEFAULT_PROMPTS, PARITY_MIN_COSINE, ExportError, ExportResult,
                           chat_template, check_export, export_sentence_transformers)
from fam.export.video import st_video

__all__ = ["DEFAULT_PROMPTS", "PARITY_MIN_COSINE", "ExportError", "ExportResult",
           "chat_template", "check_export", "export_sentence_transformers", "export_multivector",
           "st_video"]
