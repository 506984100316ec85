"""One training step (embed, loss, backward) of `prcl train`: steps/s and peak memory vs batch size,
with and without cached embeddings (GradCache).

    pytest benchmarks/bench_training.py --benchmark-only

A tiny random Llama (tests/tiny_llm.py, hidden 64, LoRA r=8) on B queries, each with its positive and
one hard negative (N ≈ 2B documents). Uncached keeps every text's activations until the backward;
cached embeds MINI texts at a time, so its peak should stay flat as B grows while its time grows by
the second forward. Peak memory is what one warm step adds to what was held before it, from
prcl.tools.bench's meter: CUDA's allocator on a GPU; on CPU the resident set of a worker process that
builds the same encoder and batch (an untimed step). Figures land in extra_info: B, N, cached, peak_mib, steps_per_s, pairs_per_s, device.
"""
import json
import platform
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_llm import CORPUS, tiny_model_and_tokenizer  # noqa: E402

from prcl.tools.bench.memory import MemoryWorker, peak_memory  # noqa: E402
from prcl.training import build_batch, forward_backward, parse_example  # noqa: E402
from prcl.training.step import batch_loss  # noqa: E402

BATCHES = (8, 32, 128)
MINI = 8
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LINES = CORPUS.strip().split("\n")


def _batch(B):
    exs = []
    for i in range(B):
        w = LINES[i % len(LINES)].split()
        exs.append(parse_example(json.dumps({"query": f"{' '.join(w[:3])} {i}", "positive": f"{' '.join(w[3:])} {i}",
                                             "negatives": [f"{LINES[(i + 7) % len(LINES)]} {i}"]})))
    return build_batch(exs)


def _encoder():
    from prcl.encoders import LLMEncoder

    model, tok = tiny_model_and_tokenizer("llama", hidden_size=64, intermediate_size=128, head_dim=16)
    enc = LLMEncoder(model, tok).add_lora(r=8, alpha=16, dropout=0.05)
    enc.model.to(DEVICE).train()
    return enc


@pytest.fixture(scope="module")
def encoder():
    # one intra-op thread on CPU: with a tiny model, two threads on a shared 2-core machine spend more
    # time waiting for each other than computing, and the timings swing by 10x between runs
    threads = torch.get_num_threads()
    if DEVICE == "cpu":
        torch.set_num_threads(1)
    yield _encoder()
    torch.set_num_threads(threads)


def _step(enc, batch, cached):
    enc.model.zero_grad(set_to_none=True)
    forward_backward(enc, batch, lambda q, d: batch_loss(q, d, batch), mini_batch_size=MINI if cached else None,
                     cached=cached, device=torch.device(DEVICE))


_worker_encoder = []


def worker_step(B, cached):
    """The step, built inside MemoryWorker's process (one encoder there for every measurement)."""
    if not _worker_encoder:
        _worker_encoder.append(_encoder())
    enc, batch = _worker_encoder[0], _batch(B)
    return lambda: _step(enc, batch, cached)


@pytest.fixture(scope="module")
def memory_worker():
    worker = MemoryWorker()
    yield worker
    worker.close()


def _peak_mib(memory_worker, fn, B, cached):
    if DEVICE == "cuda":
        peak = peak_memory(fn, DEVICE)
    else:
        peak, why = memory_worker.measure(worker_step, B, cached)
        if why:
            raise RuntimeError(f"peak memory: {why}")
    return peak / 2**20


@pytest.mark.parametrize("cached", [False, True], ids=["uncached", f"cached-mini{MINI}"])
@pytest.mark.parametrize("B", BATCHES, ids=[f"B{b}" for b in BATCHES])
def test_train_step(benchmark, encoder, memory_worker, B, cached):
    batch = _batch(B)
    B_, N = batch.shape
    peak = _peak_mib(memory_worker, lambda: _step(encoder, batch, cached), B, cached)
    benchmark.pedantic(_step, args=(encoder, batch, cached), rounds=5, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(B=B_, N=N, cached=cached, mini_batch_size=MINI if cached else None,
                                peak_mib=round(peak, 2), steps_per_s=round(1 / median, 3),
                                pairs_per_s=round(B_ * N / median), device=DEVICE,
                                cpu=platform.processor() or platform.machine(), torch=torch.__version__)
    print(f"\nB={B_} N={N} {'cached' if cached else 'uncached'}: {1 / median:.2f} steps/s, peak {peak:.1f} MiB")
