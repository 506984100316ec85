"""The checked single-process loss beneath prcl.fused_pair_bce and the distributed strategies.

    loss = Σ_i Σ_j [softplus(z_ij) − y_ij·z_ij] / B,   z = t·q·dᵀ + b,   pairs with y < 0 left out

Callers check their inputs once (prcl.core.contract.check_inputs) and pick the backend (prcl.core.ops); what
is left here is device work. No tensor value is read on the host and no Python float is copied to
the device (scalars are filled in place), so a CUDA call never waits for the GPU and can be captured
in a CUDA graph.
"""
import math

import torch
from torch import Tensor

from prcl.backends import torch_impl
from prcl.core import ops
from prcl.core.contract import LossOutput, Scalar, default_bias
from prcl.core.labels import kernel_labels


def scalar(x: Scalar, device: torch.device) -> Tensor:
    """A float or 0-dim tensor as a float32 0-dim tensor on `device` (tensors keep their autograd
    history). Floats are filled on the device, not copied from the host: torch.tensor(x, device=cuda)
    would be a blocking host-to-device copy on every call."""
    if isinstance(x, Tensor):
        return x.float()
    return torch.full((), float(x), dtype=torch.float32, device=device)


def false_negative_threshold(q: Tensor, d: Tensor, y: Tensor, index: Tensor | None,
                             margin: float | None) -> Tensor | None:
    """The per-row threshold of the false-negative mask, float32 (B,), a constant for autograd:
    p_i + margin, p_i the largest q_i·d_j over row i's pairs with y > 0 (+inf for a row without one).
    A pair with y = 0 above it is excluded in the kernels. None when margin is None."""
    if margin is None:
        return None
    with torch.no_grad():
        best = torch_impl.labelled_max(q.detach(), d.detach(), y, index)
        return torch.where(best > -math.inf, best + margin, math.inf)


def pair_bce(q: Tensor, d: Tensor, labels: Tensor | None, label_index: Tensor | None, scale: Scalar,
             bias: Scalar | None, reduction: str, backend: str, n_queries: int | None = None,
             margin: float | None = None, return_masked: bool = False,
             threshold: Tensor | None = None) -> LossOutput:
    """The loss of checked inputs on a named backend; bias=None is −log(N−1) of this call's N; the
    mean divides by n_queries (default B: other ranks' queries count in the distributed mean).
    margin: the false-negative mask (prcl.fused_pair_bce), or its thresholds computed by the caller
    (the ring strategy: from the rank's own documents); return_masked adds the number of pairs it
    excluded, an int64 0-dim tensor (one more forward pass, 2·B·N·D)."""
    y, index = kernel_labels(labels, label_index, q.shape[0], q.device)
    if threshold is None:
        threshold = false_negative_threshold(q, d, y, index, margin)
    out = _loss(q, d, y, index, scale, bias, reduction, backend, n_queries, threshold)
    return (out, masked_pairs(q, d, y, index, threshold)) if return_masked else out


def masked_pairs(q: Tensor, d: Tensor, y: Tensor, index: Tensor | None, threshold: Tensor | None) -> Tensor:
    """How many pairs `threshold` (or None: none) excludes, an int64 0-dim tensor on q's device."""
    if threshold is None:
        return q.new_zeros((), dtype=torch.int64)
    with torch.no_grad():
        return torch_impl.masked_count(q.detach(), d.detach(), y, index, threshold)


def _loss(q: Tensor, d: Tensor, y: Tensor, index: Tensor | None, scale: Scalar, bias: Scalar | None,
          reduction: str, backend: str, n_queries: int | None, threshold: Tensor | None) -> Tensor:
    n_queries = q.shape[0] if n_queries is None else n_queries
    t = scalar(scale, q.device)
    b = scalar(default_bias(d.shape[0]) if bias is None else bias, q.device)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, d, t, b))
    if reduction != "none" and needs_grad:
        # the mean's 1/B goes into the op, so that the gradients are rounded once, with it applied
        weight = 1.0 / n_queries if reduction == "mean" else 1.0
        return ops.total(q, d, t, b, y, index, backend, weight, threshold)
    rows = ops.rows(q, d, t, b, y, index, backend, threshold)
    if reduction == "none":
        return rows
    return rows.sum() / n_queries if reduction == "mean" else rows.sum()


def pair_bce_grads(q: Tensor, d: Tensor, labels: Tensor | None, label_index: Tensor | None, t: Tensor, b: Tensor,
                   grad_rows: Tensor | None, backend: str, threshold: Tensor | None = None) -> tuple[Tensor, ...]:
    """Without autograd, for callers that sum gradients over several calls (the ring strategy): the
    row losses (B,) when grad_rows (B,) is given, else their sum, and the float32 gradients of
    Σ_i grad_rows_i·loss_i (or of the sum) w.r.t. q, d, t, b, left unrounded for the caller to sum."""
    y, index = kernel_labels(labels, label_index, q.shape[0], q.device)
    if grad_rows is None:
        return torch.ops.prcl.pair_bce_total(q, d, t, b, y, index, backend, threshold=threshold)
    rows = torch.ops.prcl.pair_bce_rows(q, d, t, b, y, index, backend, threshold)
    return (rows, *torch.ops.prcl.pair_bce_rows_backward(q, d, t, b, y, index, grad_rows, backend,
                                                         threshold=threshold))
