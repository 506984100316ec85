"""The one door into the kernels: `prcl::` ops registered with torch.library, and the backend registry.

    pair_bce_rows(q, d, t, b, Y)  = [Σ_j l_ij]_i     l_ij = softplus(z_ij) − y_ij·z_ij,  z = t·q·dᵀ + b   (B,)
    pair_bce_total(q, d, t, b, Y) = (Σ_ij l_ij, and its gradients)

Y reaches the kernels in one of two label-light layouts (prcl.core.labels builds them from the public forms):
`labels (B, N), label_index None` is a dense label tile; `labels (B, K), label_index (B, K)` lists
y for pairs (i, label_index[i, k]), every other pair has y = 0 and an index outside [0, N) lists
nothing. A pair with y < 0 is excluded: no loss, no gradient. Each kernel forms σ(z) − y in float32
inside its epilogue, before anything is rounded to 16 bits, so that the gradient of a converged
positive (σ → 1, y = 1) keeps its digits (see docs/design.md, "Labels inside the kernels").

Labels that require grad get ∂/∂y_ij = −(upstream weight of row i)·z_ij at included pairs (`label_grad`),
computed in backward from the saved inputs, only when asked.

`rows` is the forward-only pass (2·B·N·D); its backward recomputes with per-row upstream gradients
(`rows_backward`, 6·B·N·D). `total` computes the gradient inside the forward (6·B·N·D) and returns it
as extra outputs, so its backward only rescales: the path for scalar losses; `weight` folds the
reduction's 1/B into it, so that backward's rescaling is by the upstream gradient alone (1, exact, for
`loss.backward()`). Gradients are accumulated in float32 and leave the ops either rounded once to the
inputs' dtypes (`rounded=True`, autograd's path: no float32 (B+N)×D copies outlive the kernel) or in
float32 (the ring strategy sums them across calls before its one rounding).

The kernel backends are registered by name in REGISTRY and implement the `Backend` protocol:
`rows(q, d, t, b, labels, label_index, threshold)` and `grads(q, d, t, b, labels, label_index, w, c,
rounded, threshold)` -> (rows, c·G·d, c·Gᵀ·q, Σ G∘S, Σ G) with G_ij = w_i·(σ(z_ij) − y_ij)
(prcl.backends.panels); all run on CPU tensors, triton through its interpreter.

`total` and `rows` are the loss's entry points (prcl.core.loss): the ops with their autograd. A plain
eager call runs the implementation directly; the ops themselves are the door whenever something may
intercept the call (see `_through_ops`).
"""
import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from prcl.backends import torch_impl
from prcl.backends.panels import acc_dtype
from prcl.core.contract import triton_interpreting
from prcl.core.labels import listed_pairs

Grads = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]  # rows (B,), c·G·d (B, D), c·Gᵀ·q (N, D), Σ G∘S, Σ G


class Backend(Protocol):
    """A kernel backend: a module with these two functions (prcl.backends.torch_impl, triton_impl, native).

    q (B, D) and d (N, D) share a floating dtype and a device; scale and bias are 0-dim tensors of
    acc_dtype(q.dtype) (prcl.backends.panels); labels and label_index are in the layout above
    (prcl.core.labels); threshold is the false-negative mask's per-row thresholds (B,), float32, or
    None. No backend reads a tensor value on the host."""

    def rows(self, q: Tensor, d: Tensor, scale: Tensor, bias: Tensor, labels: Tensor,
             label_index: Tensor | None, threshold: Tensor | None = None) -> Tensor:
        """Σ_j l_ij per row, (B,) in acc_dtype."""
        ...

    def grads(self, q: Tensor, d: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, label_index: Tensor | None,
              w: Tensor | None, grad_scale: Tensor, rounded: bool, threshold: Tensor | None = None) -> Grads:
        """Row sums and the gradient pieces of Σ_i w_i Σ_j l_ij (w (B,), or None for all 1) with
        c = grad_scale: c·G·d and c·Gᵀ·q in the inputs' dtype when rounded, else in acc_dtype; Σ G∘S
        and Σ G in acc_dtype."""
        ...


def _torch() -> Backend:
    return torch_impl


def _triton() -> Backend:
    from prcl.backends import triton_impl  # imports triton: only when a call asks for it

    return triton_impl


def _native() -> Backend:
    from prcl.backends import native  # loads the C++ library when first imported

    return native


def _usable_anywhere(device: torch.device) -> str | None:
    return None


def _triton_unusable(device: torch.device) -> str | None:
    if device.type != "cuda" and not triton_interpreting():
        return (f"backend='triton' needs CUDA tensors (q is on {device}), or TRITON_INTERPRET=1 set before "
                "triton is imported to run the kernels in Triton's interpreter")
    return None


def _native_unusable(device: torch.device) -> str | None:
    from prcl.backends import native

    if device.type != "cpu" or not native.available():
        return (f"backend='native' needs CPU tensors (q is on {device}) and the built native library "
                f"({native.status()})")
    return None


@dataclass(frozen=True)
class Registered:
    """A kernel backend's entry. `load` returns its implementation, importing it on first use (triton
    is a heavy, optional import); `unusable(device)` says why it cannot run on tensors of `device`, or
    None when it can, without importing triton."""
    load: Callable[[], Backend]
    unusable: Callable[[torch.device], str | None]


# The kernel backends by name: the values of the public `backend=` besides None and "reference"
# (prcl.core.contract.BACKEND_CHOICES, which tests/test_errors.py checks against this)
REGISTRY: dict[str, Registered] = {
    "triton": Registered(_triton, _triton_unusable),
    "torch": Registered(_torch, _usable_anywhere),
    "native": Registered(_native, _native_unusable),
}


@functools.cache
def backend_impl(name: str) -> Backend:
    """The registered backend `name`'s implementation."""
    return REGISTRY[name].load()


@functools.cache
def _cuda_kernel_usable(device: torch.device) -> bool:
    # the kernel needs bf16 tensor cores and host tensor descriptors (sm_80+, triton>=3.4)
    return torch.cuda.get_device_capability(device)[0] >= 8 and importlib.util.find_spec("triton") is not None


def auto_backend(device: torch.device) -> str:
    """backend=None: Triton on CUDA (sm_80+), the native C++ kernel on CPU when built, else PyTorch."""
    if device.type == "cuda":
        return "triton" if _cuda_kernel_usable(device) else "torch"
    if device.type == "cpu":
        return "native" if _native_unusable(device) is None else "torch"
    return "torch"  # any other device (meta, mps, …): the PyTorch twin runs wherever torch does


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The kernel backend a call runs on: `auto_backend`'s choice for None (usable by construction),
    else the named one, checked (`check_backend`)."""
    if backend is None:
        return auto_backend(device)
    check_backend(backend, device)
    return backend


def check_backend(name: str, device: torch.device) -> None:
    """ValueError when backend `name` is not registered or cannot run on tensors of `device`."""
    if name not in REGISTRY:
        raise ValueError(f"backend: expected one of {tuple(REGISTRY)}, got {name!r}")
    why = REGISTRY[name].unusable(device)
    if why is not None:
        raise ValueError(why)


def _grads(q: Tensor, d: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, label_index: Tensor | None,
           w: Tensor | None, backend: str, weight: float, rounded: bool,
           threshold: Tensor | None = None) -> Grads:
    """rows and the gradients of weight·Σ_i w_i Σ_j l_ij w.r.t. q, d, t, b."""
    grad_scale = scale.to(acc_dtype(q.dtype)) * weight
    rows, dq, dd, gs, g = backend_impl(backend).grads(q, d, scale, bias, labels, label_index, w, grad_scale, rounded,
                                                      threshold)
    return rows, dq, dd, gs * weight, g * weight  # not in place: the two-pass sums are views of one tensor


# Defined through torch.library.Library rather than torch.library.custom_op: custom_op wraps each
# implementation in torch._disable_dynamo, whose first call imports torch._dynamo (~3 s of a
# user's first loss call), although eager calls never need it. The native C++ library adds its ops to
# the same namespace, hence a fragment.
_lib = torch.library.Library("prcl", "FRAGMENT")
_ARGS = "Tensor q, Tensor d, Tensor scale, Tensor bias, Tensor labels, Tensor? label_index"


def _define(schema: str, impl: Callable[..., Any]) -> Any:
    """Defines prcl::<schema> with one implementation for every device (below autograd)."""
    _lib.define(schema)
    name = schema.split("(")[0]
    _lib.impl(name, impl, "CompositeExplicitAutograd")
    return getattr(torch.ops.prcl, name).default


def _rows(q: Tensor, d: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, label_index: Tensor | None,
          backend: str, threshold: Tensor | None = None) -> Tensor:
    return backend_impl(backend).rows(q, d, scale, bias, labels, label_index, threshold)


def _rows_bwd(q: Tensor, d: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, label_index: Tensor | None,
              grad_rows: Tensor, backend: str, rounded: bool = False,
              threshold: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    w = grad_rows.to(acc_dtype(q.dtype)).contiguous()
    _, dq, dd, dt, db = _grads(q, d, scale, bias, labels, label_index, w, backend, 1.0, rounded, threshold)
    return dq, dd, dt, db


def _total(q: Tensor, d: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, label_index: Tensor | None,
           backend: str, weight: float = 1.0, rounded: bool = False,
           threshold: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    rows, dq, dd, dt, db = _grads(q, d, scale, bias, labels, label_index, None, backend, weight, rounded, threshold)
    return rows.sum().mul_(weight), dq, dd, dt, db


# threshold (B,): false negatives, a pair with y = 0 and q_i·d_j > threshold_i is excluded (prcl.core.loss)
pair_bce_rows = _define(f"pair_bce_rows({_ARGS}, str backend, Tensor? threshold=None) -> Tensor", _rows)
pair_bce_rows_backward = _define(
    f"pair_bce_rows_backward({_ARGS}, Tensor grad_rows, str backend, bool rounded=False, Tensor? threshold=None) "
    "-> (Tensor, Tensor, Tensor, Tensor)", _rows_bwd)
pair_bce_total = _define(f"pair_bce_total({_ARGS}, str backend, float weight=1.0, bool rounded=False, "
                         "Tensor? threshold=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)", _total)


def _grad_dtype(x: Tensor, rounded: bool) -> torch.dtype:
    return x.dtype if rounded else acc_dtype(x.dtype)


@torch.library.register_fake("prcl::pair_bce_rows", lib=_lib)
def _(q: Tensor, d: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, label_index: Tensor | None, backend: str,
      threshold: Tensor | None = None) -> Tensor:
    return q.new_empty(q.shape[0], dtype=acc_dtype(q.dtype))


@torch.library.register_fake("prcl::pair_bce_rows_backward", lib=_lib)
def _(q: Tensor, d: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, label_index: Tensor | None,
      grad_rows: Tensor, backend: str, rounded: bool = False,
      threshold: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    acc = acc_dtype(q.dtype)
    return (q.new_empty(q.shape, dtype=_grad_dtype(q, rounded)), d.new_empty(d.shape, dtype=_grad_dtype(d, rounded)),
            q.new_empty((), dtype=acc), q.new_empty((), dtype=acc))


def label_grad(q: Tensor, d: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, label_index: Tensor | None,
               w: Tensor, threshold: Tensor | None = None) -> Tensor:
    """∂(Σ_i w_i Σ_j l_ij)/∂y_ij = −w_i·z_ij for included pairs (y ≥ 0, not masked as false negatives by
    threshold), 0 for excluded ones and unlisted slots; w is (B, 1) or a scalar. Dense labels get it on
    their (B, N) tile, the gradient's own size; listed labels at their pairs only."""
    acc = acc_dtype(q.dtype)
    q, d = q.to(acc), d.to(acc)
    if label_index is None:
        s, keep = q @ d.T, labels >= 0
    else:
        keep = listed_pairs(label_index, d.shape[0]) & (labels >= 0)
        s = torch_impl.listed_dots(q, d, label_index)
    if threshold is not None:
        keep &= (labels != 0) | (s <= threshold[:, None])
    z = s.mul_(scale).add_(bias)  # s is this function's own: in place
    return torch.where(keep, -w * z, 0.0).to(labels.dtype)


class _FirstOrderOnly(torch.autograd.Function):
    """Passes finished gradients through, and raises when anything differentiates them. The ops'
    backward is not itself differentiable: returning its results plainly under create_graph=True (or
    a nested torch.func transform, which always builds a graph) would make the second derivative 0,
    a plausible wrong number. `anchors` are the inputs the gradients depend on."""
    generate_vmap_rule = True  # torch.func.jacrev runs a backward under vmap

    @staticmethod
    def forward(n_anchors: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(g.view_as(g) for g in tensors[n_anchors:])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> None:
        raise NotImplementedError("prcl.fused_pair_bce: double backward (a gradient of its gradient, hessians) is "
                                  "not supported; use backend='reference' for higher-order gradients")


def _first_order(anchors: tuple[Tensor | None, ...],
                 grads: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
    """grads as they are in a plain backward; when the backward itself is recorded (grad mode on),
    behind a node that refuses to be differentiated."""
    if not torch.is_grad_enabled():
        return grads
    live = [a for a in anchors if a is not None and a.requires_grad]
    present = [g for g in grads if g is not None]
    passed = iter(_FirstOrderOnly.apply(len(live), *live, *present))
    return tuple(None if g is None else next(passed) for g in grads)


def _rows_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    q, d, scale, bias, labels, label_index, backend, threshold = (*inputs, None)[:8]
    ctx.save_for_backward(q, d, scale, bias, labels, label_index, threshold)
    ctx.backend = backend


def _rows_backward(ctx: Any, grad_rows: Tensor) -> tuple[Tensor | None, ...]:
    q, d, scale, bias, labels, label_index, threshold = ctx.saved_tensors
    dq = dd = dt = db = dy = None
    with torch.no_grad():
        if any(ctx.needs_input_grad[:4]):
            backward = pair_bce_rows_backward if _through_ops() else _rows_bwd
            dq, dd, dt, db = backward(q, d, scale, bias, labels, label_index, grad_rows, ctx.backend, True, threshold)
            dt, db = dt.to(scale.dtype), db.to(bias.dtype)
        if ctx.needs_input_grad[4]:
            dy = label_grad(q, d, scale, bias, labels, label_index, grad_rows[:, None], threshold)
    return (*_first_order((q, d, scale, bias, labels), (dq, dd, dt, db, dy)), None, None, None)


torch.library.register_autograd("prcl::pair_bce_rows", _rows_backward, setup_context=_rows_setup, lib=_lib)


@torch.library.register_fake("prcl::pair_bce_total", lib=_lib)
def _(q: Tensor, d: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, label_index: Tensor | None,
      backend: str, weight: float = 1.0, rounded: bool = False, threshold: Tensor | None = None) -> Grads:
    acc = acc_dtype(q.dtype)
    return (q.new_empty((), dtype=acc), q.new_empty(q.shape, dtype=_grad_dtype(q, rounded)),
            d.new_empty(d.shape, dtype=_grad_dtype(d, rounded)), q.new_empty((), dtype=acc),
            q.new_empty((), dtype=acc))


def _total_setup(ctx: Any, inputs: tuple[Any, ...], output: Grads) -> None:
    q, d, scale, bias, labels, label_index, backend, weight, rounded, threshold = (*inputs, 1.0, False, None)[:10]
    _, dq, dd, dt, db = output
    ctx.mark_non_differentiable(dq, dd, dt, db)
    ctx.set_materialize_grads(False)  # no zero tensors for the gradient outputs' (unused) gradients
    # the inputs: the labels' gradient is computed from them in backward, and a recorded backward
    # hangs its refusal to be differentiated on them (_first_order)
    ctx.save_for_backward(dq, dd, dt, db, q, d, scale, bias, labels, label_index, threshold)
    ctx.weight = weight
    ctx.dtypes = q.dtype, d.dtype, scale.dtype, bias.dtype


def _total_backward(ctx: Any, grad_total: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
    if grad_total is None:  # the loss itself was not used (grads are not materialised)
        return (None,) * 10
    dq, dd, dt, db, q, d, scale, bias, labels, label_index, threshold = ctx.saved_tensors
    with torch.no_grad():
        # the gradient was computed (and, on autograd's path, rounded) in the forward; backward only
        # scales it by the upstream gradient, exactly when that is 1 or a power of two
        grads = [(grad_total * g).to(dtype) if wanted else None
                 for g, dtype, wanted in zip((dq, dd, dt, db), ctx.dtypes, ctx.needs_input_grad)]
        dy = label_grad(q, d, scale, bias, labels, label_index, grad_total * ctx.weight, threshold) \
            if ctx.needs_input_grad[4] else None
    return (*_first_order((q, d, scale, bias, labels), (*grads, dy)), None, None, None, None, None)


torch.library.register_autograd("prcl::pair_bce_total", _total_backward, setup_context=_total_setup, lib=_lib)


class PairBCERows(torch.autograd.Function):
    """prcl::pair_bce_rows with its autograd as an autograd.Function, the form torch.func (grad, jacrev)
    accepts: the Function that torch.library.register_autograd generates for an op has no
    setup_context, which torch.func requires."""

    forward = staticmethod(pair_bce_rows)
    setup_context = staticmethod(_rows_setup)
    backward = staticmethod(_rows_backward)


class PairBCETotal(torch.autograd.Function):
    """prcl::pair_bce_total with its autograd, for torch.func (see PairBCERows)."""

    forward = staticmethod(pair_bce_total)
    setup_context = staticmethod(_total_setup)
    backward = staticmethod(_total_backward)


class _EagerRows(torch.autograd.Function):
    """PairBCERows for plain eager calls: the implementation without the dispatcher, and the classic
    Function form, whose apply skips the argument binding that setup_context's form costs per call."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> Tensor:
        out = _rows(*inputs)
        _rows_setup(ctx, inputs, out)
        return out

    backward = staticmethod(_rows_backward)


class _EagerTotal(torch.autograd.Function):
    """PairBCETotal for plain eager calls (see _EagerRows)."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> tuple[Tensor, ...]:
        out = _total(*inputs)
        _total_setup(ctx, inputs, out)
        return out

    backward = staticmethod(_total_backward)


def _through_ops() -> bool:
    """Whether a call goes through the registered ops: while torch.compile traces (it sees one opaque
    op and its fake), under torch.func transforms (which need the setup_context form of a Function)
    and under a TorchDispatchMode (FakeTensorMode, FlopCounterMode: they see the op). A plain eager
    call runs the same implementation directly: the dispatcher's Python round trips (boxing, the
    generated autograd kernel, redispatch) and Function.apply's argument binding were about a quarter
    of a B = N = 32, D = 64 fwd+bwd on CPU. Forward-mode AD (a dual level open) and torch.jit.trace take
    the ops too: the first raises there rather than dropping tangents, the second records the op."""
    return (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or torch._C._len_torch_dispatch_stack() > 0 or torch.jit.is_tracing()
            or torch.autograd.forward_ad._current_level >= 0)


def total(q: Tensor, d: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, label_index: Tensor | None,
          backend: str, weight: float, threshold: Tensor | None = None) -> Tensor:
    """weight·Σ_ij l_ij, a 0-dim tensor whose gradient (rounded to the inputs' dtypes) is computed in
    this forward; for scalar losses with gradients."""
    args = (q, d, scale, bias, labels, label_index, backend, weight, True, threshold)
    return (PairBCETotal if _through_ops() else _EagerTotal).apply(*args)[0]


def rows(q: Tensor, d: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, label_index: Tensor | None,
         backend: str, threshold: Tensor | None = None) -> Tensor:
    """Σ_j l_ij per row (B,), differentiable w.r.t. q, d, scale, bias and labels."""
    args = (q, d, scale, bias, labels, label_index, backend, threshold)
    if _through_ops():
        return PairBCERows.apply(*args)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, d, scale, bias, labels)):
        return _EagerRows.apply(*args)
    return _rows(*args)
