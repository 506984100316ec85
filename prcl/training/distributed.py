"""Training under torchrun: process group setup, gradient summing (the softmax loss across ranks: softmax.py).

Each rank embeds its slice of the global batch; the loss scores its queries against every rank's
documents and the ranks' losses sum to the global loss (prcl.fused_pair_bce with process_group does
this for PRCL). The global gradient is then the SUM of the ranks' gradients, not their mean, which is
why trainable gradients are all-reduced here rather than by DDP (whose default averages).
"""
import os
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist


def setup(timeout: timedelta | None = None) -> tuple[dist.ProcessGroup | None, int, int]:
    """(process_group, rank, world_size): WORLD under torchrun (gloo on CPU, nccl on CUDA), else (None, 0, 1).

    timeout (a timedelta) bounds how long a collective waits for a rank that stopped answering."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, 0, 1
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return dist.group.WORLD, dist.get_rank(), dist.get_world_size()


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def sum_gradients(params: Sequence[torch.Tensor], process_group: dist.ProcessGroup | None) -> None:
    """All-reduce (SUM) the gradients of params in one flat buffer; a missing grad counts as zero."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).to(p.dtype)


def sum_scalar(x: float | torch.Tensor, process_group: dist.ProcessGroup | None) -> float:
    t = torch.tensor(float(x), dtype=torch.float64)
    if dist.get_backend(process_group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, group=process_group)
    return t.item()
