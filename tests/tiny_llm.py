"""Tiny randomly initialised decoder LLMs and a tokenizer built on the spot: encoder tests without a download.

    model, tokenizer = tiny_model_and_tokenizer("qwen2", causal_lm=True, attn_implementation="eager")
"""
import collections
import re

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from prcl.encoders.models import word_tokenizer

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
VOCAB_SIZE = 256
PAD, UNK, BOS, EOS = range(4)

CORPUS = """
the cat sat on the mat and looked at the dog
a dog runs in the park with a red ball
cats and dogs are common pets in many homes
the stock market fell sharply on monday morning
investors sold shares after the bank raised interest rates
the central bank kept rates unchanged this quarter
python is a programming language used for machine learning
a neural network learns weights from training data
transformers use attention to mix information between tokens
the recipe needs flour sugar eggs and butter
bake the cake in a hot oven for forty minutes
fresh bread smells good in the morning
the football team won the final match of the season
the player scored two goals in the second half
rain is expected tomorrow with strong wind in the north
the weather will be sunny and warm at the weekend
represent this sentence for searching relevant passages
given a question retrieve documents that answer the question
query passage document search retrieval answer
what is the capital of france paris is the capital of france
how do i train an embedding model with a contrastive loss
one two three four five six seven eight nine ten
"""


def tiny_tokenizer(padding_side="right", bos=True):
    """A lower-casing word-level tokenizer over CORPUS's words, the most frequent first, after [PAD] [UNK] [BOS]
    [EOS]; it prepends [BOS] like Llama's, or with bos=False adds no special token (like SmolLM2's: "" and "   "
    become no tokens at all)."""
    counts = collections.Counter(re.findall(r"\w+|[^\w\s]+", CORPUS.lower()))
    tok = word_tokenizer(sorted(counts, key=lambda w: (-counts[w], w)), lowercase=True, bos=bos,
                         padding_side=padding_side)
    assert len(tok) <= VOCAB_SIZE
    return tok


def tiny_config(family="llama", **overrides):
    """hidden 32, 2 layers, 4 query heads over 2 key/value heads (GQA), head_dim 8."""
    kw = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
              pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=True)
    if family not in FAMILIES:  # e.g. "gpt2" for the unsupported-family test: only the shared fields
        kw = dict(vocab_size=VOCAB_SIZE, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    kw.update(overrides)
    return AutoConfig.for_model(family, **kw)


def tiny_model_and_tokenizer(family="llama", *, causal_lm=False, attn_implementation="sdpa", seed=0,
                             padding_side="right", **overrides):
    """(model, tokenizer): a float32 randomly initialised `family` model in eval mode and `tiny_tokenizer()`.

    causal_lm=True returns the *ForCausalLM wrapper; overrides go to the config (e.g. num_hidden_layers=1).
    """
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    auto = AutoModelForCausalLM if causal_lm else AutoModel
    model = auto.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.eval(), tiny_tokenizer(padding_side)
