"""What the tests, the benchmarks and the GPU check share: inputs, labels, and the float64-oracle
accuracy rule with its floors.

The rule (docs/design.md, "Accuracy"): gold = prcl.backends.reference in float64 on the same rounded
inputs, baseline = the same eager formula in the dtype under test, and for the loss and each gradient

    err(prcl) <= 2 * err(eager) + floor[dtype]      (errors relative to max |gold|)
"""
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from prcl.backends.reference import pair_bce

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# half a unit roundoff of each dtype: small enough that the errors of a 16-bit σ − y cancellation
# (8x the eager error, ~1e-2 relative in bf16) cannot hide under it
LATE_FLOOR = {torch.float32: 1e-6, torch.float16: 2.5e-4, torch.bfloat16: 2e-3}
FORMS = ("diagonal", "graded", "dense", "sparse")  # the public label forms
OUTPUTS = ("loss", "dq", "dd", "dscale", "dbias")
Device = str | torch.device


def pair_inputs(B: int, N: int, D: int, dtype: torch.dtype = torch.float32, *, seed: int = 0, spread: float = 1.0,
                cos: float | None = None, device: Device = "cpu") -> tuple[Tensor, Tensor, torch.Generator]:
    """Queries q (B, D) and documents d (N, D), unit rows times `spread`, in `dtype` on `device`, and the
    generator that drew them (draw the labels from it next).

    Args:
        cos: None: positive d_i (i < min(B, N)) is d_i + 0.5·q_i normalized, resembling its query (cosine
            ≈ 0.45 at a large D). A number: d_i at exactly that cosine from q_i, the late-training regime
            where σ(z_ii) → 1 at a large scale.
    Returns:
        (q, d, generator).
    Example:
        >>> q, d, gen = pair_inputs(4, 6, 8, torch.bfloat16, seed=1)
    """
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, D, generator=gen), dim=1)
    u = torch.randn(N, D, generator=gen)
    d = F.normalize(u, dim=1)
    n = min(B, N)
    if cos is None:
        d[:n] = F.normalize(d[:n] + 0.5 * q[:n], dim=1)
    else:
        ortho = F.normalize(u[:n] - (u[:n] * q[:n]).sum(1, keepdim=True) * q[:n], dim=1)
        d[:n] = cos * q[:n] + math.sqrt(1 - cos ** 2) * ortho
    if spread != 1.0:
        q, d = q * spread, d * spread
    return q.to(device, dtype), d.to(device, dtype), gen


def late_training_inputs(B: int, N: int, D: int, cos: float, seed: int = 0,
                         device: Device = "cpu") -> tuple[Tensor, Tensor, torch.Generator]:
    """Late in training: float32 unit queries, document i (i < B) at cosine `cos` from query i, the other
    documents random (pair_inputs with cos).

    Example:
        >>> q, d, gen = late_training_inputs(48, 64, 40, 0.95)
    """
    return pair_inputs(B, N, D, seed=seed, cos=cos, device=device)


def labels_with_exclusions(form: str, B: int, N: int, gen: torch.Generator, *, device: Device = "cpu",
                           converged: bool = False) -> tuple[Tensor | None, Tensor | None]:
    """Labels of one public form for the accuracy checks, with excluded pairs (label −1) and unlisted
    (index −1) entries mixed in. Not prcl.tools.bench's "sparse" case (prcl.tools.bench.cases.listed_labels:
    a training batch's shape, nothing excluded).

    Args:
        form: "diagonal" (no labels), "graded" (B,), "dense" (B, N) or "sparse" (B, K ≤ 3) with label_index.
        converged: graded labels are 1 where not excluded (late training: y = 1 where σ → 1).
    Returns:
        (labels, label_index), each None where the form has none.
    Example:
        >>> q, d, gen = pair_inputs(5, 7, 8)
        >>> labels, label_index = labels_with_exclusions("sparse", 5, 7, gen)
    """
    if form == "diagonal":
        return None, None
    if form == "graded":
        y = torch.ones(B) if converged else torch.rand(B, generator=gen)
        y[torch.rand(B, generator=gen) < 0.2] = -1.0
        return y.to(device), None
    if form == "dense":
        y = torch.where(torch.rand(B, N, generator=gen) < 0.1, torch.rand(B, N, generator=gen), 0.0)
        y[torch.rand(B, N, generator=gen) < 0.05] = -1.0
        return y.to(device), None
    if form != "sparse":
        raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
    K = min(3, N)
    idx = torch.stack([torch.randperm(N, generator=gen)[:K] for _ in range(B)])
    idx[torch.rand(B, K, generator=gen) < 0.25] = -1
    y = torch.rand(B, K, generator=gen)
    y[torch.rand(B, K, generator=gen) < 0.2] = -1.0
    return y.to(device), idx.to(device)


def laid_out(x: Tensor, layout: str = "contiguous") -> Tensor:
    """x as a leaf that requires grad: "contiguous": as given (its own strides); "sliced": a slice of a
    wider tensor (base off 16 bytes, odd row stride); "transposed": column-major."""
    if layout == "sliced":
        wide = x.new_zeros(x.shape[0], x.shape[1] + 3)
        wide[:, 1:1 + x.shape[1]] = x
        return wide.requires_grad_()[:, 1:1 + x.shape[1]]
    if layout == "transposed":
        return x.t().contiguous().requires_grad_().t()
    if layout != "contiguous":
        raise ValueError(f"layout: expected contiguous, sliced or transposed, got {layout!r}")
    return x.detach().requires_grad_()


def loss_and_grads(fn: Callable, q: Tensor, d: Tensor, labels: Tensor | None, label_index: Tensor | None,
                   dtype: torch.dtype, reduction: str, scale: float = 7.0, bias: float = -3.0, *,
                   layout: str = "contiguous", **options: Any) -> list[Tensor]:
    """[loss, dq, dd, dscale, dbias] of fn(q, d, labels, label_index=…, scale=…, bias=…, reduction=…,
    **options) at q, d cast to `dtype` (in `layout`), with tensor scale and bias; the loss is weighted
    0.5 … 1.5 over its elements before the backward, so that a per-row error cannot cancel.

    Example:
        >>> q, d, _ = pair_inputs(4, 6, 8)
        >>> loss, dq, dd, dscale, dbias = loss_and_grads(pair_bce, q, d, None, None, torch.float64, "mean")
    """
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q, d = laid_out(q.detach().to(dtype), layout), laid_out(d.detach().to(dtype), layout)
    t = torch.tensor(scale, dtype=acc, device=q.device, requires_grad=True)
    b = torch.tensor(bias, dtype=acc, device=q.device, requires_grad=True)
    y = None if labels is None else labels.to(acc)
    loss = fn(q, d, y, label_index=label_index, scale=t, bias=b, reduction=reduction, **options)
    weights = torch.linspace(0.5, 1.5, loss.numel(), device=q.device, dtype=loss.dtype).reshape(loss.shape)
    grads = torch.autograd.grad((loss * weights).sum(), (q, d, t, b))
    return [loss.detach()] + [g.detach() for g in grads]


def rel_err(x: Tensor, gold: Tensor) -> float:
    """max |x − gold| / max |gold|; the 0.1 floor on the divisor keeps cases whose gold is exactly 0 (every
    pair excluded) meaningful, the quantities compared being O(0.1–10) otherwise."""
    return ((x.double() - gold).abs().max() / gold.abs().max().clamp(min=0.1)).item()


def judge(fused: list[Tensor], eager: list[Tensor], gold: list[Tensor], floor: float) -> dict[str, dict]:
    """The accuracy rule per output of loss_and_grads: {name: {"err", "eager_err", "ok"}}, ok when the
    output is finite and err <= 2·eager_err + floor."""
    verdicts = {}
    for name, f, e, g in zip(OUTPUTS, fused, eager, gold):
        fe, ee = rel_err(f, g), rel_err(e, g)
        verdicts[name] = dict(err=fe, eager_err=ee, ok=bool(torch.isfinite(f).all()) and fe <= 2 * ee + floor)
    return verdicts


def assert_within_rule(fused: list[Tensor], eager: list[Tensor], gold: list[Tensor], q: Tensor, d: Tensor,
                       dtype: torch.dtype, floor: dict[torch.dtype, float] = FLOOR) -> None:
    """Assert the accuracy rule, a float32 loss and gradients of q and d in `dtype`."""
    assert fused[0].dtype == torch.float32
    for name, f in zip(("dq", "dd"), fused[1:3]):
        assert f.dtype == dtype, f"{name} came back as {f.dtype}"
    for name, v in judge(fused, eager, gold, floor[dtype]).items():
        assert v["ok"], f"{name}: fused err {v['err']:.3g} vs eager err {v['eager_err']:.3g}"


def check_against_oracle(fused_fn: Callable, q: Tensor, d: Tensor, labels: Tensor | None,
                         label_index: Tensor | None, dtype: torch.dtype, reduction: str,
                         floor: dict[torch.dtype, float] = FLOOR,
                         **scalars: Any) -> None:
    """fused_fn against the float64 oracle and the eager formula in `dtype`, under the accuracy rule.

    Example:
        >>> q, d, gen = pair_inputs(5, 7, 8)
        >>> check_against_oracle(prcl.functional.fused_pair_bce, q, d, None, None, torch.bfloat16, "mean")
    """
    gold = loss_and_grads(pair_bce, q, d, labels, label_index, torch.float64, reduction, **scalars)
    eager = loss_and_grads(pair_bce, q, d, labels, label_index, dtype, reduction, **scalars)
    fused = loss_and_grads(fused_fn, q, d, labels, label_index, dtype, reduction, **scalars)
    assert_within_rule(fused, eager, gold, q, d, dtype, floor)
