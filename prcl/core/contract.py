"""Input checks for the public contract (docs/design.md, "Contract"), shared by every backend and the
reference.

Shape, dtype and device checks run always (they are static under torch.compile). Checks of label
values read them on the host only for CPU tensors; on a GPU they are device-side asserts, so a call
never waits for the device. They are skipped while torch.compile traces, so that compiling a training
step never breaks the graph.
"""
import math
import os
import sys
from typing import TypeGuard

import torch
from torch import Tensor

Scalar = float | Tensor  # a logit scale or bias: a float, or a 0-dim tensor that may require grad
LossOutput = Tensor | tuple[Tensor, Tensor]  # the loss, or (loss, masked pairs) with return_masked

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REDUCTIONS = ("mean", "sum", "none")
# The values of the public `backend=` argument: None chooses (prcl.core.ops.auto_backend); "reference"
# is the eager formula (prcl.backends.reference); the others name a kernel backend (prcl.core.ops.REGISTRY)
BACKEND_CHOICES = (None, "triton", "torch", "native", "reference")
# The logit scale t of every default in prcl, for cosine similarity: on the man-pages benchmark's dev
# split (README, "Training quality") t = 5 with b = −log(N−1) had the best mean at lr 1e-4 and 2e-4 (by
# about one seed std over t = 10); t ≥ 20 with that bias was far worse.
DEFAULT_SCALE = 5.0


def triton_interpreting() -> bool:
    """Whether Triton kernels run in its interpreter (on CPU tensors); read without importing triton."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def default_bias(n_docs: int) -> float:
    """Logit adjustment to the label prior of one positive among n_docs candidates: −log(N−1)."""
    return -math.log(n_docs - 1) if n_docs > 1 else 0.0


def _shapes(**tensors: object) -> str:
    return ", ".join(f"{k}{tuple(v.shape)}" for k, v in tensors.items() if isinstance(v, torch.Tensor))


def finite_number(value: object) -> TypeGuard[int | float]:
    """Whether value is a finite int or float (bools are not numbers here). Comparisons, not
    math.isfinite: torch.compile(dynamic=True) traces them on a symbolic float; ints past the float
    range (10**400) are not finite, rather than an OverflowError later."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int):
        return abs(value) <= sys.float_info.max
    return -math.inf < value < math.inf


def describe_number(value: object) -> str:
    """repr(value) for a message; an int past the float range by its magnitude (its repr may have
    thousands of digits, or be refused by Python's int-to-str limit)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > sys.float_info.max:
        return f"an int of about 10**{round(abs(value).bit_length() * math.log10(2))}"
    return repr(value)


def check_scalar(name: str, value: object, like: Tensor | None = None, *, positive: bool = False) -> None:
    """The logit scale (positive=True) or bias: a finite int or float (> 0 when positive). With `like`
    (the loss's q) also a 0-dim floating tensor on like's device, whose value is not read; without it
    (prcl.nn.PairBCELoss's settings) only a number. None is the caller's to allow."""
    if like is None:
        if not finite_number(value) or (positive and value <= 0):
            want = "a finite float > 0" if positive else "None or a finite float"
            raise ValueError(f"{name}: expected {want}, got {describe_number(value)}")
        return
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise ValueError(f"{name}: expected a float or a 0-dim floating tensor, got {value.dtype} "
                             f"tensor of shape {tuple(value.shape)}")
        if value.device != like.device:
            raise ValueError(f"{name}: tensor is on {value.device} but q is on {like.device}")
        return
    if not finite_number(value):
        raise ValueError(f"{name}: expected a finite float or a 0-dim tensor, got {describe_number(value)}")
    if positive and value <= 0:
        # float(): under torch.compile(dynamic=True) value may be symbolic, which a format string refuses
        raise ValueError(f"{name}: must be > 0, got {float(value)}")


def check_inputs(q: Tensor, d: Tensor, labels: Tensor | None, label_index: Tensor | None, scale: Scalar,
                 bias: Scalar | None, reduction: str, backend: str | None,
                 dtypes: tuple[torch.dtype, ...] = DTYPES) -> None:
    """ValueError naming the argument (and the shapes) when the arguments, those of prcl.fused_pair_bce,
    break the contract; a wrong type is caught here too."""
    for name, x in (("q", q), ("d", d), ("labels", labels), ("label_index", label_index), ("scale", scale),
                    ("bias", bias)):
        if isinstance(x, torch.Tensor) and x.layout != torch.strided:
            hint = ", or the labelled pairs as labels (B, K) with label_index (B, K)" if name == "labels" else ""
            raise ValueError(f"{name}: a {x.layout} tensor; prcl takes dense (strided) tensors: pass "
                             f"{name}.to_dense(){hint}")
    for name, x in (("q", q), ("d", d)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name}: expected a 2-D tensor, got {got}")
        if x.dtype not in dtypes:
            raise ValueError(f"{name}: dtype {x.dtype} is not one of {', '.join(map(str, dtypes))}")
    if q.dtype != d.dtype:
        raise ValueError(f"q and d must share a dtype, got q {q.dtype} and d {d.dtype}")
    if q.device != d.device:
        raise ValueError(f"q and d must share a device, got q on {q.device} and d on {d.device}")
    B, D = q.shape
    N = d.shape[0]
    if B == 0 or N == 0 or D == 0:
        raise ValueError(f"empty batch: {_shapes(q=q, d=d)}")
    if d.shape[1] != D:
        raise ValueError(f"q and d must have the same embedding dim, got {_shapes(q=q, d=d)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend: expected one of {BACKEND_CHOICES}, got {backend!r}")
    check_scalar("scale", scale, q, positive=True)
    if bias is not None:
        check_scalar("bias", bias, q)
    _check_labels(q, d, labels, label_index)


def _check_labels(q: Tensor, d: Tensor, labels: Tensor | None, label_index: Tensor | None) -> None:
    B, N = q.shape[0], d.shape[0]
    if label_index is not None and labels is None:
        raise ValueError(f"label_index{tuple(label_index.shape)} given without labels")
    if labels is None:
        if N < B:
            raise ValueError(f"labels=None pairs query i with document i, which needs N >= B: {_shapes(q=q, d=d)}")
        return
    if not isinstance(labels, torch.Tensor) or not labels.is_floating_point():
        raise ValueError(f"labels: expected a floating tensor, got {getattr(labels, 'dtype', type(labels))}")
    if labels.device != q.device:
        raise ValueError(f"labels: on {labels.device} but q is on {q.device}")
    if label_index is not None:
        if not isinstance(label_index, torch.Tensor) or label_index.dtype != torch.int64:
            raise ValueError(f"label_index: expected an int64 tensor, got {getattr(label_index, 'dtype', type(label_index))}")
        if label_index.device != q.device:
            raise ValueError(f"label_index: on {label_index.device} but q is on {q.device}")
        if labels.dim() != 2 or labels.shape[0] != B or label_index.shape != labels.shape:
            raise ValueError(f"labels and label_index must both be (B, K) with B = q.shape[0]: "
                             f"{_shapes(q=q, labels=labels, label_index=label_index)}")
    elif labels.dim() == 1:
        if labels.shape[0] != B:
            raise ValueError(f"labels: graded diagonal labels must be (B,): {_shapes(q=q, labels=labels)}")
        if N < B:
            raise ValueError(f"labels of shape (B,) pair query i with document i, which needs N >= B: "
                             f"{_shapes(q=q, d=d, labels=labels)}")
    elif labels.dim() != 2 or labels.shape != (B, N):
        raise ValueError(f"labels: expected (B,), (B, N), or (B, K) with label_index: "
                         f"{_shapes(q=q, d=d, labels=labels)}")
    if torch.compiler.is_compiling():
        return
    if labels.device.type == "cpu":
        _check_label_values(labels, label_index, N)
    else:
        _assert_label_values(labels, label_index, N)


def _duplicate_index(label_index: Tensor) -> Tensor:
    ordered = label_index.sort(dim=1).values
    return ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any()


def _check_label_values(labels: Tensor, label_index: Tensor | None, N: int) -> None:
    """CPU tensors: reading values costs no device sync, so check them and say what was found."""
    if torch.isnan(labels).any() or (labels > 1).any():
        raise ValueError(f"labels: values must lie in [0, 1] (or < 0 to exclude a pair); found "
                         f"{'NaN' if torch.isnan(labels).any() else f'max {labels.max().item():.4g}'}")
    if label_index is not None:
        if ((label_index < -1) | (label_index >= N)).any():
            raise ValueError(f"label_index: values must lie in [-1, N) = [-1, {N}); found "
                             f"[{label_index.min().item()}, {label_index.max().item()}]")
        if _duplicate_index(label_index):
            raise ValueError("label_index: a document index appears twice in one row; list each pair once")


def _assert_label_values(labels: Tensor, label_index: Tensor | None, N: int) -> None:
    """Device tensors: the same checks as asserts that the device raises on its own, without the host
    waiting for a value (a CUDA error surfaces at the next synchronising call)."""
    torch._assert_async(~(torch.isnan(labels) | (labels > 1)).any(),
                        "prcl: labels: values must lie in [0, 1] (or < 0 to exclude a pair)")
    if label_index is not None:
        torch._assert_async(((label_index >= -1) & (label_index < N)).all(),
                            f"prcl: label_index: values must lie in [-1, N) = [-1, {N})")
        torch._assert_async(~_duplicate_index(label_index),
                            "prcl: label_index: a document index appears twice in one row")


def check_margin(margin: object, return_masked: object = False) -> None:
    """false_negative_margin: None or a finite float; return_masked: a bool."""
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                               or not math.isfinite(margin)):
        raise ValueError(f"false_negative_margin: expected None or a finite float, got {margin!r}")
    if not isinstance(return_masked, bool):
        raise ValueError(f"return_masked: expected a bool, got {return_masked!r}")
