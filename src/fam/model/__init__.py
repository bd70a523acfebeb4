"""The embedding model (EOS pooling over a backbone adapter) and its LoRA operations."""
from fam.model.embedding import EmbeddingModel, EmbeddingOutput, autocast_for, select_tokens
from fam.model.lora import apply_lora, load_lora, merge_lora, save_lora
from fam.model.multivector import MultiVectorHead, load_multivector, save_multivector

__all__ = ["EmbeddingModel", "EmbeddingOutput", "autocast_for", "select_tokens", "apply_lora",
           "load_lora", "merge_lora", "save_lora", "MultiVectorHead", "load_multivector",
           "save_multivector"]
