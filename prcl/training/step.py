"""Loss of one batch and its backward, with or without cached embeddings (GradCache, Gao et al. 2021).

Cached: the encoder's activations for the whole batch never coexist. Peak memory is one mini-batch.

    1. e_k = embed(chunk_k) under no_grad for every mini-batch k            (no activations kept)
    2. L = loss(q, d) on the detached embeddings; L.backward() -> g_k = ∂L/∂e_k  (and ∂L/∂scale)
    3. e_k = embed(chunk_k) again with grad; e_k.backward(g_k)              (one chunk alive at a time)

Step 3 gives Σ_k g_k · ∂e_k/∂θ = ∂L/∂θ, the uncached gradient, provided step 3 recomputes exactly the
embeddings of step 1: dropout draws from the RNG, so each chunk's RNG state is saved before step 1 and
restored before step 3, then the state after step 1 is put back so later draws match an uncached run.
"""
import contextlib
import math

import torch

import prcl
from prcl.core.contract import DEFAULT_SCALE

LOSSES = ("prcl", "softmax")


def info_nce(q, d, labels, label_index, *, scale, reduction="mean", n_queries=None, false_negative_margin=None,
             return_masked=False):
    """InfoNCE over each query's row of scaled similarities, the softmax baseline on PRCL's batches.

        loss_i = −Σ_j w_ij · log softmax_j(t·q_i·d_j),   w_ij = y_ij / Σ_j y_ij  over y_ij > 0

    Several positives or graded documents become a soft target weighted by relevance (a graded document
    at 0.5 gets half a positive's share); excluded pairs (y < 0) are masked with −inf so they are in
    neither numerator nor denominator; hard negatives and unlisted pairs (y = 0) are in the denominator
    only. false_negative_margin masks as prcl.fused_pair_bce does: a y = 0 pair whose similarity exceeds
    the row's best positive's + margin leaves the denominator; return_masked adds how many (int64 tensor).
    Materialises the (B, N) logits: this is the comparison, not the scalable path.
    """
    B, N = q.shape[0], d.shape[0]
    y = torch.zeros(B, N, device=q.device)
    listed = label_index >= 0
    rows = torch.arange(B, device=q.device)[:, None].expand_as(listed)
    y[rows[listed], label_index[listed]] = labels[listed].float()
    s = q.float() @ d.float().T
    masked = torch.zeros_like(y, dtype=torch.bool)
    if false_negative_margin is not None:
        best = torch.where(y > 0, s.detach(), -math.inf).amax(1, keepdim=True)
        masked = (y == 0) & (s.detach() > best + false_negative_margin) & (best > -math.inf)
    z = torch.as_tensor(scale, dtype=torch.float32, device=q.device) * s
    logp = torch.log_softmax(z.masked_fill((y < 0) | masked, -math.inf), dim=1)
    w = y.clamp(min=0)
    w = w / w.sum(1, keepdim=True).clamp(min=1e-12)  # a row without positives contributes 0
    per_query = -(w * logp.masked_fill(w == 0, 0.0)).sum(1)
    out = per_query if reduction == "none" else per_query.sum() / (n_queries or B)
    return (out, masked.sum()) if return_masked else out


def batch_loss(q, d, batch, *, loss="prcl", scale=DEFAULT_SCALE, bias=None, backend=None, process_group=None,
               false_negative_margin=None, return_masked=False):
    """Loss of a Batch's embeddings q (B, D), d (N, D); scale/bias may be tensors that learn.
    false_negative_margin / return_masked: the false-negative mask, as prcl.fused_pair_bce's."""
    labels, label_index = batch.labels.to(q.device), batch.label_index.to(q.device)
    mask = dict(false_negative_margin=false_negative_margin, return_masked=return_masked)
    if loss == "prcl":
        return prcl.fused_pair_bce(q, d, labels, label_index=label_index, scale=scale, bias=bias,
                                   backend=backend, process_group=process_group, **mask)
    if loss == "softmax":
        if process_group is None:
            return info_nce(q, d, labels, label_index, scale=scale, **mask)
        from prcl.training.distributed import gathered_info_nce

        return gathered_info_nce(q, d, labels, label_index, scale=scale, process_group=process_group, **mask)
    raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")


def embed_texts(encoder, texts, instructions, **embed_kw):
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


def chunks(batch, mini_batch_size):
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


def forward_backward(encoder, batch, loss_fn, *, mini_batch_size=None, cached=True, device=None,
                     autocast=contextlib.nullcontext, loss_weight=1.0, packed=False, max_tokens=None):
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
