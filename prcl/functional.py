"""prcl.fused_pair_bce: the pair relevance classification loss without the B×N logit matrix.

    loss = Σ_i Σ_j [softplus(z_ij) − y_ij·z_ij] / B,   z = t·q·dᵀ + b,   excluded pairs (y < 0) left out

The public signature and its routing: one process (prcl.core.loss on a backend of prcl.core.ops), several
(prcl.distributed), or the eager reference. Labels and exclusions enter the kernels themselves;
docs/design.md says why.
"""
from typing import TYPE_CHECKING, Optional, Union

import torch
from torch import Tensor

from prcl.core import loss
from prcl.backends import reference
from prcl.core.contract import DEFAULT_SCALE, LossOutput, Scalar, check_inputs, check_margin
from prcl.core.ops import resolve_backend

if TYPE_CHECKING:
    import torch.distributed as dist

    from prcl.distributed import Gather, Ring

# a torch.distributed group, or the strategy wrappers of prcl.distributed; None: one process
ProcessGroupArg = Union["dist.ProcessGroup", "Gather", "Ring", None]


def fused_pair_bce(q: Tensor, d: Tensor, labels: Optional[Tensor] = None, *, label_index: Optional[Tensor] = None,
                   scale: Scalar = DEFAULT_SCALE, bias: Optional[Scalar] = None, reduction: str = "mean",
                   backend: Optional[str] = None, process_group: ProcessGroupArg = None,
                   false_negative_margin: Optional[float] = None, return_masked: bool = False) -> LossOutput:
    """Pair relevance classification loss over every query × document pair.

    q (B, D), d (N, D): float32/float16/bfloat16. labels: None (pair (i, i) positive), (B,) graded
    diagonal, (B, N) dense, or (B, K) with label_index (B, K) int64 (−1 pads); labels < 0 exclude a
    pair. bias=None means −log(N−1). backend: None (automatic), "triton", "torch", "native",
    "reference". process_group: a torch.distributed group (or prcl.distributed.Ring/Gather of one).
    false_negative_margin: mask probable false negatives. With p_i the largest q_i·d_j (before scale
    and bias) over row i's pairs with label > 0, a pair with label 0 (explicit, or implied by the
    diagonal and sparse forms) and q_i·d_j > p_i + margin is excluded, as if its label were < 0; rows
    without a label > 0 are not masked; the mask is a constant for autograd. return_masked=True returns
    (loss, number of pairs masked) with the count an int64 0-dim tensor on the inputs' device (one more
    forward pass, 2·B·N·D; this rank's queries' pairs when distributed).
    Returns float32: a scalar, or (B,) for reduction="none"; gradients come back in the inputs' dtypes.
    """
    check_margin(false_negative_margin, return_masked)
    if process_group is not None:
        from prcl.distributed import distributed_pair_bce

        if torch.is_grad_enabled() and isinstance(labels, Tensor) and labels.requires_grad:
            raise ValueError("labels: a gradient w.r.t. labels is computed in one process only (process_group=None); "
                             "pass labels.detach()")

        return distributed_pair_bce(q, d, labels, label_index=label_index, scale=scale, bias=bias,
                                    reduction=reduction, backend=backend, process_group=process_group,
                                    false_negative_margin=false_negative_margin, return_masked=return_masked)
    if backend == "reference":
        return reference.pair_bce(q, d, labels, label_index=label_index, scale=scale, bias=bias,
                                  reduction=reduction, false_negative_margin=false_negative_margin,
                                  return_masked=return_masked)
    check_inputs(q, d, labels, label_index, scale, bias, reduction, backend)
    backend = resolve_backend(backend, q.device)
    return loss.pair_bce(q, d, labels, label_index, scale, bias, reduction, backend,
                         margin=false_negative_margin, return_masked=return_masked)
