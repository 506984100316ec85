"""LLMEncoder.encode throughput, padded vs packed batches, per attention backend available here.

    pytest benchmarks/bench_encoders.py --benchmark-only

A small random Llama (tests/tiny_llm.py, widened to hidden 128) on texts of 4–120 words: long-tailed
lengths are where padding wastes work and packing pays. tokens/s counts real tokens, not padding.
On CUDA the model runs in bf16, so packed sdpa batches take torch's varlen kernel; extra_info names the
packed path that ran (LLMEncoder.packed_attention).
On a busy 2-core machine OpenMP threads spin against other processes and wall times swing tenfold:
`OMP_NUM_THREADS=1` gives stable figures there.
"""
import platform
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_llm import CORPUS, tiny_model_and_tokenizer  # noqa: E402

from prcl.encoders import LLMEncoder, flash_attn_available  # noqa: E402

BACKENDS = ["sdpa", "eager"] + (["flash_attention_2"] if flash_attn_available() and torch.cuda.is_available() else [])
N_TEXTS, BATCH = 64, 32
MODEL = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32)


def texts(n=N_TEXTS, seed=0):
    rng = random.Random(seed)
    words = CORPUS.split()
    return [" ".join(rng.choices(words, k=int(rng.paretovariate(1.2) * 4)))[:600] for _ in range(n)]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_encode_throughput(benchmark, backend, packed):
    model, tok = tiny_model_and_tokenizer("llama", attn_implementation=backend, **MODEL)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    enc = LLMEncoder(model.to(device, torch.bfloat16 if device == "cuda" else torch.float32), tok, max_length=128)
    batch = texts()
    n_tokens = sum(len(ids) for ids, _ in enc.tokenize(batch))
    benchmark.pedantic(enc.encode, args=(batch,), kwargs=dict(batch_size=BATCH, packed=packed),
                       rounds=3, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        backend=backend, mode=enc.packed_attention if packed else "padded",
        dtype=str(model.dtype).removeprefix("torch."), texts=len(batch), tokens=n_tokens,
        tokens_per_s=round(n_tokens / median), hidden=MODEL["hidden_size"], layers=model.config.num_hidden_layers,
        device=(torch.cuda.get_device_name() if device == "cuda"
                else f"{platform.processor() or platform.machine()} cpu, {torch.get_num_threads()} threads"),
        torch=torch.__version__)
