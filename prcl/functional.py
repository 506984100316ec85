"""prcl.fused_pair_bce: the pair relevance classification loss without the B×N logit matrix.

    loss = Σ_i Σ_j [softplus(z_ij) − y_ij·z_ij] / B,   z = t·q·dᵀ + b,   excluded pairs (y < 0) left out

The public signature and its routing: one process (prcl.core.loss on a backend of prcl.core.ops), several
(prcl.distributed), or the eager reference. Labels and exclusions enter the kernels themselves;
docs/design.md says why.
"""
from typing import TYPE_CHECKING, Union

import torch
from torch import Tensor

from prcl.backends import reference
from prcl.core import loss
from prcl.core.contract import DEFAULT_SCALE, LossOutput, Scalar, check_inputs, check_margin
from prcl.core.ops import resolve_backend

if TYPE_CHECKING:
    import torch.distributed as dist

    from prcl.distributed import Gather, Ring

# a torch.distributed group, or the strategy wrappers of prcl.distributed; None: one process
ProcessGroupArg = Union["dist.ProcessGroup", "Gather", "Ring", None]


def fused_pair_bce(q: Tensor, d: Tensor, labels: Tensor | None = None, *, label_index: Tensor | None = None,
                   scale: Scalar = DEFAULT_SCALE, bias: Scalar | None = None, reduction: str = "mean",
                   backend: str | None = None, process_group: ProcessGroupArg = None,
                   false_negative_margin: float | None = None, return_masked: bool = False) -> LossOutput:
    """Pair relevance classification loss over every query × document pair.

    loss = Σ_i Σ_j [softplus(z_ij) − y_ij·z_ij] / B with z = scale·q·dᵀ + bias, computed without the
    B×N logit matrix; pairs with a label < 0 are left out (no loss, no gradient).

    Args:
        q: queries (B, D), float32, float16 or bfloat16.
        d: documents (N, D), the same dtype and device as q.
        labels: None (pair (i, i) positive, every other pair negative; N ≥ B); (B,) graded relevance
            of pair (i, i); (B, N) dense; or (B, K) with `label_index`. Values in [0, 1]; < 0 excludes
            the pair.
        label_index: with (B, K) labels, int64 (B, K): label k of query i belongs to document
            label_index[i, k]; −1 pads. Every pair not listed is a negative.
        scale: logit scale t > 0, a float or a 0-dim tensor (a tensor that requires grad gets one).
        bias: logit bias b, a float or 0-dim tensor; None means −log(N−1), the prior of one positive
            among N documents.
        reduction: "mean" (sum over pairs ÷ B), "sum", or "none" (one loss per query, (B,)).
        backend: None (Triton on CUDA, the native C++ kernel on CPU, else PyTorch), "triton",
            "torch", "native" or "reference" (the eager formula, materialising B×N).
        process_group: a torch.distributed group, or prcl.distributed.Ring/Gather of one: this rank's
            queries against every rank's documents; the ranks' losses sum to the one-process loss.
        false_negative_margin: None (off), or a float m: with p_i the largest q_i·d_j (before scale
            and bias) over row i's pairs with label > 0, a pair with label 0 (explicit, or implied by
            the diagonal and sparse forms) and q_i·d_j > p_i + m is excluded, as if its label were
            < 0. Rows without a label > 0 are not masked; the mask is a constant for autograd.
        return_masked: also return the number of masked pairs (one more forward pass, 2·B·N·D; this
            rank's queries' pairs when distributed).

    Returns:
        float32: a scalar, or (B,) for reduction="none"; with return_masked=True, (loss, masked) where
        masked is an int64 0-dim tensor on the inputs' device. Gradients come back in the inputs'
        dtypes.

    Raises:
        ValueError: bad input, naming the argument and the shapes.

    Example:
        >>> import torch, torch.nn.functional as F, prcl
        >>> g = torch.Generator().manual_seed(0)
        >>> q = F.normalize(torch.randn(4, 8, generator=g), dim=1).requires_grad_()
        >>> d = F.normalize(torch.randn(6, 8, generator=g), dim=1)
        >>> loss = prcl.fused_pair_bce(q, d)                 # pair (i, i) positive, bias −log(6 − 1)
        >>> loss.shape, loss.dtype
        (torch.Size([]), torch.float32)
        >>> z = 5.0 * q @ d.T - torch.log(torch.tensor(5.0))  # the same loss, the eager way
        >>> torch.allclose(loss, F.binary_cross_entropy_with_logits(z, torch.eye(4, 6), reduction="sum") / 4)
        True
        >>> loss.backward()
        >>> q.grad.shape
        torch.Size([4, 8])
        >>> y = torch.tensor([[1.0, 0.5], [1.0, -1.0], [0.8, 0.0], [1.0, 0.0]])   # sparse, graded
        >>> idx = torch.tensor([[0, 4], [1, 5], [2, -1], [3, -1]])                # −1 pads
        >>> prcl.fused_pair_bce(q.detach(), d, y, label_index=idx, reduction="none").shape
        torch.Size([4])
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
