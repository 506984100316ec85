"""The one door into the kernels: `prcl::` ops registered with torch.library.

    pair_softplus_rows(q, d, t, b)  = [Σ_j softplus(t·q_i·d_j + b)]_i                  (B,)
    pair_softplus_total(q, d, t, b) = (Σ_ij softplus(t·q_i·d_j + b), and its gradients)

`rows` is the forward-only pass (2·B·N·D); its backward recomputes with per-row upstream gradients
(`rows_backward`, 6·B·N·D). `total` computes the gradient inside the forward (6·B·N·D) and returns
it as extra outputs, so its backward only rescales: the path for scalar losses.
Each op takes the backend name ("triton", "torch", "native") and runs on CPU and CUDA tensors.
"""
import torch
from torch import Tensor

from prcl import torch_impl
from prcl.panels import acc_dtype


def _backend(name):
    if name == "torch":
        return torch_impl
    if name == "triton":
        from prcl import triton_impl

        return triton_impl
    if name == "native":
        from prcl import native

        return native
    raise ValueError(f"backend: unknown kernel backend {name!r}")


def _grads(q, d, scale, bias, w, backend):
    rows, gd, gq, gs, g = _backend(backend).softplus_grads(q, d, scale, bias, w)
    t = scale.to(acc_dtype(q.dtype))
    return rows, gd * t, gq * t, gs, g


@torch.library.custom_op("prcl::pair_softplus_rows", mutates_args=())
def pair_softplus_rows(q: Tensor, d: Tensor, scale: Tensor, bias: Tensor, backend: str) -> Tensor:
    return _backend(backend).softplus_rows(q, d, scale, bias)


@pair_softplus_rows.register_fake
def _(q, d, scale, bias, backend):
    return q.new_empty(q.shape[0], dtype=acc_dtype(q.dtype))


@torch.library.custom_op("prcl::pair_softplus_rows_backward", mutates_args=())
def pair_softplus_rows_backward(q: Tensor, d: Tensor, scale: Tensor, bias: Tensor, grad_rows: Tensor,
                                backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _, dq, dd, dt, db = _grads(q, d, scale, bias, grad_rows.to(acc_dtype(q.dtype)).contiguous(), backend)
    return dq, dd, dt, db


@pair_softplus_rows_backward.register_fake
def _(q, d, scale, bias, grad_rows, backend):
    f32 = acc_dtype(q.dtype)
    return (q.new_empty(q.shape, dtype=f32), d.new_empty(d.shape, dtype=f32),
            q.new_empty((), dtype=f32), q.new_empty((), dtype=f32))


def _rows_setup(ctx, inputs, output):
    q, d, scale, bias, backend = inputs
    ctx.save_for_backward(q, d, scale, bias)
    ctx.backend = backend


def _rows_backward(ctx, grad_rows):
    q, d, scale, bias = ctx.saved_tensors
    dq, dd, dt, db = pair_softplus_rows_backward(q, d, scale, bias, grad_rows, ctx.backend)
    return dq.to(q.dtype), dd.to(d.dtype), dt.to(scale.dtype), db.to(bias.dtype), None


pair_softplus_rows.register_autograd(_rows_backward, setup_context=_rows_setup)


@torch.library.custom_op("prcl::pair_softplus_total", mutates_args=())
def pair_softplus_total(q: Tensor, d: Tensor, scale: Tensor, bias: Tensor,
                        backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    rows, dq, dd, dt, db = _grads(q, d, scale, bias, None, backend)
    return rows.sum(), dq, dd, dt, db


@pair_softplus_total.register_fake
def _(q, d, scale, bias, backend):
    f32 = acc_dtype(q.dtype)
    return (q.new_empty((), dtype=f32), q.new_empty(q.shape, dtype=f32), d.new_empty(d.shape, dtype=f32),
            q.new_empty((), dtype=f32), q.new_empty((), dtype=f32))


def _total_setup(ctx, inputs, output):
    q, d, scale, bias, _ = inputs
    _, dq, dd, dt, db = output
    ctx.mark_non_differentiable(dq, dd, dt, db)
    ctx.save_for_backward(dq, dd, dt, db)
    ctx.dtypes = q.dtype, d.dtype, scale.dtype, bias.dtype


def _total_backward(ctx, grad_total, *_):
    # the gradient was computed in the forward; backward only scales it by the upstream gradient
    return (*((grad_total * g).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)), None)


pair_softplus_total.register_autograd(_total_backward, setup_context=_total_setup)
