"""The contract computed the obvious eager way: BCE-with-logits on t·q·dᵀ + b, materialising B×N.

    loss = bce_with_logits(t * q @ d.T + b, Y, reduction="none")[Y >= 0].sum() / B

Oracle for the tests and baseline for the benchmarks; docs/design.md ("Contract") states it. It also
takes float64 inputs, so that the tests' gold values come from the same code.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from prcl.core.contract import DEFAULT_SCALE, DTYPES, LossOutput, Scalar, check_inputs, check_margin, default_bias
from prcl.core.labels import dense_labels


def pair_bce(q: Tensor, d: Tensor, labels: Tensor | None = None, *, label_index: Tensor | None = None,
             scale: Scalar = DEFAULT_SCALE, bias: Scalar | None = None, reduction: str = "mean",
             backend: str | None = None, process_group: object = None,
             false_negative_margin: float | None = None, return_masked: bool = False) -> LossOutput:
    """prcl.fused_pair_bce's loss (same arguments, float64 inputs too) computed eagerly on the B×N matrix."""
    check_inputs(q, d, labels, label_index, scale, bias, reduction, backend, DTYPES + (torch.float64,))
    check_margin(false_negative_margin, return_masked)
    if process_group is not None:
        raise ValueError("process_group: the eager reference runs in one process; pass process_group=None")
    B, N = q.shape[0], d.shape[0]
    if bias is None:
        bias = default_bias(N)
    Y = dense_labels(labels, label_index, B, N, q.device)
    s = (q @ d.T).to(torch.promote_types(q.dtype, torch.float32))
    masked = torch.zeros_like(Y, dtype=torch.bool)
    if false_negative_margin is not None:  # label-0 pairs above the best positive's similarity + margin
        best = torch.where(Y > 0, s.detach(), -math.inf).amax(1, keepdim=True)
        masked = (Y == 0) & (s.detach() > best + false_negative_margin) & (best > -math.inf)  # rows with one
    z = scale * s + bias
    Y = torch.where(masked, -1.0, Y).to(z.dtype)
    per_pair = F.binary_cross_entropy_with_logits(z, Y.clamp(min=0), reduction="none")
    rows = torch.where(Y >= 0, per_pair, 0.0).sum(1)
    out = rows if reduction == "none" else rows.sum() / B if reduction == "mean" else rows.sum()
    return (out, masked.sum()) if return_masked else out
