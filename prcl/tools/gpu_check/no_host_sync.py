"""Section 3: forward and backward of every label form under torch.cuda.set_sync_debug_mode("error")."""
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from prcl.testing import FORMS, labels_with_exclusions, pair_inputs
from prcl.tools.gpu_check.common import Check, error_line

if TYPE_CHECKING:
    from prcl.core.contract import LossOutput


def loss_call(ck: Check, form: str, B: int, N: int, D: int, dtype: torch.dtype, seed: int = 1,
              margin: float | None = None) -> tuple[Callable[..., "LossOutput"], tuple[torch.Tensor, ...]]:
    """(fn, tensors) for one forward+backward of prcl on device tensors made in advance; margin: the
    false-negative mask, whose count is then returned too (never read here)."""
    import prcl

    q, d, gen = pair_inputs(B, N, D, dtype, seed=seed, device=ck.device)
    labels, label_index = labels_with_exclusions(form, B, N, gen, device=ck.device)
    q, d = q.requires_grad_(), d.requires_grad_()
    t = torch.full((), 10.0, device=ck.device, requires_grad=True)
    b = torch.full((), -5.0, device=ck.device, requires_grad=True)

    def step(reduction: str = "mean") -> "LossOutput":
        loss = prcl.fused_pair_bce(q, d, labels, label_index=label_index, scale=t, bias=b, reduction=reduction,
                                   backend=ck.backend, false_negative_margin=margin, return_masked=margin is not None)
        value = loss[0] if margin is not None else loss
        (value if reduction != "none" else value.sum()).backward()
        return loss

    return step, (q, d, t, b)


def section(ck: Check, rec: dict[str, Any]) -> None:
    B, N, D = (20, 30, 16) if ck.dry_run else (300, 1000, 96)
    rows = rec["rows"] = []
    for form, reduction, margin in itertools.product(FORMS, ("mean", "none"), (None, 0.0)):
        step, _ = loss_call(ck, form, B, N, D, torch.bfloat16, margin=margin)
        step(reduction)  # first call: compilation and caches may synchronise
        ck.sync()
        if ck.cuda:
            torch.cuda.set_sync_debug_mode("error")
        try:
            step(reduction)
            rows.append(dict(form=form, reduction=reduction, margin=margin, passed=True))
        except RuntimeError as e:
            rows.append(dict(form=form, reduction=reduction, margin=margin, passed=False, error=error_line(e)))
        finally:
            if ck.cuda:
                torch.cuda.set_sync_debug_mode(0)
    rec["passed"] = all(r["passed"] for r in rows)
    if not ck.cuda:
        rec["not_applicable"] = "sync debug mode needs CUDA: the calls ran, nothing was checked"
