"""Training under torchrun: process group setup, gradient summing, the softmax loss across ranks.

Each rank embeds its slice of the global batch; the loss scores its queries against every rank's
documents and the ranks' losses sum to the global loss (prcl.fused_pair_bce with process_group does
this for PRCL). The global gradient is then the SUM of the ranks' gradients, not their mean, which is
why trainable gradients are all-reduced here rather than by DDP (whose default averages).
"""
import os

import torch
import torch.distributed as dist

from prcl.training.step import info_nce


def setup(timeout=None):
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


def barrier(world):
    if world > 1:
        dist.barrier()


def sum_gradients(params, process_group):
    """All-reduce (SUM) the gradients of params in one flat buffer; a missing grad counts as zero."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).to(p.dtype)


def sum_scalar(x, process_group):
    t = torch.tensor(float(x), dtype=torch.float64)
    if dist.get_backend(process_group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, group=process_group)
    return t.item()


def gathered_info_nce(q, d, labels, label_index, *, scale, process_group, **mask):
    """InfoNCE of the local queries against every rank's documents, divided by the global query count so
    that the ranks' losses sum to the global loss. label_index points into the local documents; `mask`:
    info_nce's false_negative_margin and return_masked."""
    from torch.distributed.nn.functional import all_gather

    world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    sizes = torch.tensor([d.shape[0], q.shape[0]], device=d.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes, group=process_group)
    n_docs = [int(s[0]) for s in all_sizes]
    n_queries = sum(int(s[1]) for s in all_sizes)
    # all_gather needs equal shapes: pad every rank's documents to the largest N, strip after
    padded = torch.nn.functional.pad(d, (0, 0, 0, max(n_docs) - d.shape[0]))
    parts = all_gather(padded, group=process_group)  # autograd: backward sums each rank's gradient
    d_all = torch.cat([p[:n] for p, n in zip(parts, n_docs)])
    offset = sum(n_docs[:rank])
    index = torch.where(label_index >= 0, label_index + offset, label_index)
    return info_nce(q, d_all, labels, index, scale=scale, n_queries=n_queries, **mask)
