"""prcl.nn.PairBCELoss: the loss as a module, with an optionally learnable logit scale and bias.

    loss = prcl.fused_pair_bce(q, d, labels, scale=exp(logit_scale), bias=−log(N−1) + logit_bias)

SigLIP's parametrisation: the scale is learned as its log (it stays positive), the bias as an offset
on the prior −log(N−1) of one positive among N documents, so that it keeps its meaning when N
changes (a short last batch, more ranks). A fixed `bias` replaces the prior. The trainer and the
sentence-transformers losses use this module; give its parameters their own learning rate (SigLIP
trains them far faster than the encoder).
"""
import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from prcl.core.contract import DEFAULT_SCALE, LossOutput, Scalar, check_margin, check_scalar, default_bias
from prcl.functional import ProcessGroupArg, fused_pair_bce


class PairBCELoss(nn.Module):
    """Pair relevance classification loss with `logit_scale` / `logit_bias` parameters when learnable.

    Args:
        scale: logit scale t > 0 (its starting value when learnable).
        bias: logit bias b; None means −log(N−1) of each call's N (global N across ranks).
        learnable_scale: learn log t as the parameter `logit_scale`.
        learnable_bias: learn b as `logit_bias`: an offset on −log(N−1) starting at 0 when bias is
            None, else the bias itself starting at `bias`.
        reduction, backend, false_negative_margin: as for prcl.fused_pair_bce.

    Example:
        >>> import torch, torch.nn.functional as F, prcl, prcl.nn
        >>> criterion = prcl.nn.PairBCELoss(learnable_scale=True, learnable_bias=True)
        >>> criterion
        PairBCELoss(scale=exp(1.609), bias=-log(N-1) + learned, reduction='mean')
        >>> sorted(name for name, _ in criterion.named_parameters())
        ['logit_bias', 'logit_scale']
        >>> g = torch.Generator().manual_seed(0)
        >>> q = F.normalize(torch.randn(4, 8, generator=g), dim=1).requires_grad_()
        >>> d = F.normalize(torch.randn(6, 8, generator=g), dim=1)
        >>> loss = criterion(q, d)
        >>> torch.allclose(loss, prcl.fused_pair_bce(q, d))   # at the start: t = 5, b = −log(N−1)
        True
        >>> loss.backward()
        >>> criterion.logit_scale.grad.shape, criterion.logit_bias.grad.shape
        (torch.Size([]), torch.Size([]))

        Give the two parameters their own, larger learning rate (as SigLIP does):

        >>> opt = torch.optim.AdamW([{"params": [q], "lr": 1e-4},
        ...                          {"params": criterion.parameters(), "lr": 0.1}])
    """

    def __init__(self, scale: float = DEFAULT_SCALE, bias: float | None = None, *, learnable_scale: bool = False,
                 learnable_bias: bool = False, reduction: str = "mean", backend: str | None = None,
                 false_negative_margin: float | None = None) -> None:
        super().__init__()
        check_scalar("scale", scale, positive=True)
        if bias is not None:
            check_scalar("bias", bias)
        check_margin(false_negative_margin)
        self.false_negative_margin = None if false_negative_margin is None else float(false_negative_margin)
        self.fixed_scale = float(scale)
        self.fixed_bias = None if bias is None else float(bias)
        self.learnable_scale, self.learnable_bias = learnable_scale, learnable_bias
        self.reduction, self.backend = reduction, backend
        if learnable_scale:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(scale)))
        if learnable_bias:
            self.logit_bias = nn.Parameter(torch.tensor(0.0 if bias is None else float(bias)))

    def scale_and_bias(self, n_docs: int) -> tuple[Scalar, Scalar | None]:
        """(t, b) as fused_pair_bce takes them: floats, or 0-dim tensors when learnable; n_docs is
        the N the prior is taken over (every rank's documents when the loss is gathered)."""
        t = self.logit_scale.exp() if self.learnable_scale else self.fixed_scale
        if not self.learnable_bias:
            return t, self.fixed_bias
        return t, self.logit_bias + (default_bias(n_docs) if self.fixed_bias is None else 0.0)

    def forward(self, q: Tensor, d: Tensor, labels: Tensor | None = None, *,
                label_index: Tensor | None = None, process_group: ProcessGroupArg = None,
                return_masked: bool = False) -> LossOutput:
        """The loss of queries q against documents d at this module's scale and bias.

        Args:
            q: queries (B, D); d: documents (N, D); float32, float16 or bfloat16, one dtype and device.
            labels, label_index: as for prcl.fused_pair_bce (None: pair (i, i) positive).
            process_group: as for prcl.fused_pair_bce; with a learnable bias on the prior, −log(N−1)
                takes the global N (one all-reduce of the local N).
            return_masked: also return the number of pairs the false-negative margin masked.

        Returns:
            As prcl.fused_pair_bce: a float32 scalar, or (B,) for reduction="none"; with
            return_masked=True, (loss, masked).

        Example:
            >>> import torch, prcl.nn
            >>> criterion = prcl.nn.PairBCELoss(reduction="none", false_negative_margin=0.1)
            >>> q, d = torch.eye(3, 4), torch.eye(5, 4)
            >>> per_query, masked = criterion(q, d, return_masked=True)
            >>> per_query.shape, int(masked)
            (torch.Size([3]), 0)
        """
        n_docs = d.shape[0]
        if process_group is not None and self.learnable_bias and self.fixed_bias is None:
            # the prior needs the global N, and local batches may differ in size
            total = torch.tensor(n_docs, device=d.device)
            dist.all_reduce(total, group=getattr(process_group, "group", process_group))
            n_docs = int(total)
        t, b = self.scale_and_bias(n_docs)
        return fused_pair_bce(q, d, labels, label_index=label_index, scale=t, bias=b, reduction=self.reduction,
                              backend=self.backend, process_group=process_group,
                              false_negative_margin=self.false_negative_margin, return_masked=return_masked)

    def extra_repr(self) -> str:
        scale = f"exp({self.logit_scale.item():.4g})" if self.learnable_scale else f"{self.fixed_scale:g}"
        prior = "-log(N-1)" if self.fixed_bias is None else f"{self.fixed_bias:g}"
        bias = f"{prior} + learned" if self.learnable_bias and self.fixed_bias is None else (
            "learned" if self.learnable_bias else prior)
        margin = "" if self.false_negative_margin is None else f", false_negative_margin={self.false_negative_margin:g}"
        return f"scale={scale}, bias={bias}, reduction={self.reduction!r}{margin}"
