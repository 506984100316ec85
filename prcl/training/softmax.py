"""InfoNCE, the softmax baseline that `prcl train --loss softmax` runs on PRCL's batches: on one process,
and under torchrun (the local queries against every rank's documents)."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from prcl.core.contract import LossOutput, Scalar
from prcl.distributed import gather_rows


def info_nce(q: torch.Tensor, d: torch.Tensor, labels: torch.Tensor, label_index: torch.Tensor, *, scale: Scalar,
             reduction: str = "mean", n_queries: int | None = None, false_negative_margin: float | None = None,
             return_masked: bool = False) -> LossOutput:
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


def gathered_info_nce(q: torch.Tensor, d: torch.Tensor, labels: torch.Tensor, label_index: torch.Tensor, *,
                      scale: Scalar, process_group: dist.ProcessGroup | None, **mask: Any) -> LossOutput:
    """InfoNCE of the local queries against every rank's documents, divided by the global query count so
    that the ranks' losses sum to the global loss. label_index points into the local documents; `mask`:
    info_nce's false_negative_margin and return_masked. The documents' gradient reaches every rank that
    holds them (prcl.distributed.gather_rows)."""
    world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    sizes = torch.tensor([d.shape[0], q.shape[0]], device=d.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes, group=process_group)
    n_docs = [int(s[0]) for s in all_sizes]
    n_queries = sum(int(s[1]) for s in all_sizes)
    d_all = gather_rows(d, n_docs, process_group)
    offset = sum(n_docs[:rank])
    index = torch.where(label_index >= 0, label_index + offset, label_index)
    return info_nce(q, d_all, labels, index, scale=scale, n_queries=n_queries, **mask)
