"""Loss of one batch and its backward, with or without cached embeddings (GradCache, Gao et al. 2021).

Cached: the encoder's activations for the whole batch never coexist. Peak memory is one mini-batch.

    1. e_k = embed(chunk_k) under no_grad for every mini-batch k            (no activations kept)
    2. L = loss(q, d) on the detached embeddings; L.backward() -> g_k = ∂L/∂e_k  (and ∂L/∂scale)
    3. e_k = embed(chunk_k) again with grad; e_k.backward(g_k)              (one chunk alive at a time)

Step 3 gives Σ_k g_k · ∂e_k/∂θ = ∂L/∂θ, the uncached gradient, provided step 3 recomputes exactly the
embeddings of step 1: dropout draws from the RNG, so each chunk's RNG state is saved before step 1 and
restored before step 3, then the state after step 1 is put back so later draws match an uncached run.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

import prcl
from prcl.core.contract import DEFAULT_SCALE, LossOutput, Scalar
from prcl.encoders import LLMEncoder, text_list
from prcl.training.batching import Batch
from prcl.training.softmax import gathered_info_nce, info_nce

if TYPE_CHECKING:
    import torch.distributed as dist

LOSSES = ("prcl", "softmax")


def batch_loss(q: torch.Tensor, d: torch.Tensor, batch: Batch, *, loss: str = "prcl", scale: Scalar = DEFAULT_SCALE,
               bias: Scalar | None = None, backend: str | None = None, process_group: dist.ProcessGroup | None = None,
               false_negative_margin: float | None = None, return_masked: bool = False) -> LossOutput:
    """Loss of a Batch's embeddings q (B, D), d (N, D); scale/bias may be tensors that learn.
    false_negative_margin / return_masked: the false-negative mask, as prcl.fused_pair_bce's."""
    labels = batch.labels.to(q.device)
    label_index = None if batch.label_index is None else batch.label_index.to(q.device)  # None: dense
    mask = dict(false_negative_margin=false_negative_margin, return_masked=return_masked)
    if loss == "prcl":
        return prcl.fused_pair_bce(q, d, labels, label_index=label_index, scale=scale, bias=bias,
                                   backend=backend, process_group=process_group, **mask)
    if loss == "softmax":
        if process_group is None:
            return info_nce(q, d, labels, label_index, scale=scale, **mask)
        return gathered_info_nce(q, d, labels, label_index, scale=scale, process_group=process_group, **mask)
    raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")


def embed_texts(encoder: LLMEncoder, texts: list[str], instructions: list[str | None], **embed_kw: Any) -> torch.Tensor:
    """(len(texts), H) with grad (if enabled), in the encoder's output dtype (bf16/fp16 for a 16-bit model:
    the loss takes them as they are); one encoder call per distinct instruction. embed_kw (packed,
    max_tokens) go to encoder.embed."""
    groups = {}
    for i, ins in enumerate(instructions):
        groups.setdefault(ins, []).append(i)
    if len(groups) == 1:
        return encoder.embed(texts, instruction=instructions[0], **embed_kw)
    parts, order = [], []
    for ins, idx in groups.items():
        parts.append(encoder.embed([texts[i] for i in idx], instruction=ins, **embed_kw))
        order += idx
    out = torch.cat(parts)
    return out[torch.argsort(torch.tensor(order, device=out.device))]


def chunks(batch: Batch, mini_batch_size: int | None) -> list[tuple[list[str], list[str | None]]]:
    """[(texts, instructions)]: the queries, then the documents, in pieces of mini_batch_size texts."""
    step = mini_batch_size or max(len(batch.queries), len(batch.docs))
    out = []
    for texts, ins in ((batch.queries, batch.instructions), (batch.docs, [None] * len(batch.docs))):
        out += [(texts[k: k + step], ins[k: k + step]) for k in range(0, len(texts), step)]
    return out


def _rng_state(device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def forward_backward(encoder: LLMEncoder, batch: Batch, loss_fn: Callable, *, mini_batch_size: int | None = None,
                     cached: bool = True, device: torch.device | None = None,
                     autocast: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext,
                     loss_weight: float = 1.0, packed: bool = False, max_tokens: int | None = None) -> torch.Tensor:
    """Embeds `batch`, computes loss_fn(q, d) and backpropagates loss_weight·loss into the encoder's
    parameters (and any tensor loss_fn closes over). Returns the loss, detached.

    cached=False keeps every mini-batch's graph alive at once (the plain path, memory ∝ batch);
    cached=True is the GradCache path above. Both embed the same mini-batches in the same order.
    packed=True embeds each mini-batch as packed rows of at most max_tokens tokens (encoder.embed).
    """
    embed_kw = {"packed": True, "max_tokens": max_tokens} if packed else {}
    device = device or torch.device("cpu")
    parts = chunks(batch, mini_batch_size)
    B = len(batch.queries)
    if not cached:
        with autocast():
            e = torch.cat([embed_texts(encoder, texts, ins, **embed_kw) for texts, ins in parts])
        loss = loss_fn(e[:B], e[B:])
        (loss * loss_weight).backward()
        return loss.detach()

    states = []
    with torch.no_grad():
        embs = []
        for texts, ins in parts:
            states.append(_rng_state(device))
            with autocast():
                embs.append(embed_texts(encoder, texts, ins, **embed_kw))
    after = _rng_state(device)
    e = torch.cat(embs).requires_grad_()
    loss = loss_fn(e[:B], e[B:])
    (loss * loss_weight).backward()
    grads = e.grad.split([len(texts) for texts, _ in parts])
    for (texts, ins), state, g in zip(parts, states, grads):
        _set_rng_state(state, device)
        with autocast():
            emb = embed_texts(encoder, texts, ins, **embed_kw)
        emb.backward(g)
    _set_rng_state(after, device)
    return loss.detach()


def contrastive_loss_step(encoder: LLMEncoder, queries: Iterable[str], positives: Iterable[str],
                          negatives: Iterable[str] | None = None, *, instruction: str | None = None,
                          scale: Scalar = DEFAULT_SCALE, bias: Scalar | None = None, labels: torch.Tensor | None = None, packed: bool = False,
                          backend: str | None = None) -> torch.Tensor:
    """PRCL loss of one batch of texts, ready for `.backward()`: the step without a Batch or GradCache.

    Queries (with the instruction) against documents = positives then hard negatives (without it):
    q (B, H), d (B + len(negatives), H); by default pair (i, i) is the positive and every other pair a
    negative. `labels`/`scale`/`bias`/`backend` go to prcl.fused_pair_bce (bias None = −log(N−1)).

    Example:
        loss = contrastive_loss_step(enc, ["what do cats sit on"], ["the cat sat on the mat"], ["rain"])
        loss.backward()
    """
    queries, positives = text_list(queries, "queries"), text_list(positives, "positives")
    negatives = text_list(negatives or [], "negatives")
    if len(queries) != len(positives) or not queries:
        raise ValueError(f"need one positive per query and at least one query: got {len(queries)} queries, "
                         f"{len(positives)} positives")
    q = encoder.embed(queries, instruction=instruction, packed=packed)
    d = encoder.embed(positives + negatives, packed=packed)
    return prcl.fused_pair_bce(q, d, labels, scale=scale, bias=bias, backend=backend)
