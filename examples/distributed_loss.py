"""The global-batch PRCL loss across ranks, checked against one process on the concatenated batch.
No training and no quality figure here: random embeddings, and what it shows is an equality.

    torchrun --nproc_per_node=2 examples/distributed_loss.py            # gloo on CPU, nccl on CUDA
    torchrun --nproc_per_node=3 examples/distributed_loss.py --strategy ring

Every rank builds the same global batch from one seed and keeps its own slice (local sizes differ
between ranks on purpose); each rank's loss scores its queries against every rank's documents. The
ranks' losses are summed and compared with prcl.fused_pair_bce on the whole batch, and so are the
gradients of each rank's rows. Multiply the loss by prcl.distributed.ddp_loss_scale(group) when the
encoder is wrapped in DDP or FSDP (they average gradients over ranks; the global loss is a sum).
"""
import argparse
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import prcl
from prcl.distributed import Gather, Ring


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=("gather", "ring"), default="gather")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--timeout-s", type=float, default=120,
                        help="collective timeout: a rank that dies leaves the others waiting this long "
                             "(gloo's default is 30 minutes)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda" if cuda else "cpu")
    # float32 on the torch path everywhere, so the comparison below is a float32 one
    backend = None if cuda else "torch"

    # unequal local batches: rank r holds B_r = 4 + r queries and N_r = 6 + 2r documents
    b_sizes = [4 + r for r in range(world)]
    n_sizes = [6 + 2 * r for r in range(world)]
    g = torch.Generator().manual_seed(0)
    Q = F.normalize(torch.randn(sum(b_sizes), args.dim, generator=g), dim=1).to(device)
    Dd = F.normalize(torch.randn(sum(n_sizes), args.dim, generator=g), dim=1).to(device)
    q_rows = slice(sum(b_sizes[:rank]), sum(b_sizes[:rank + 1]))
    d_rows = slice(sum(n_sizes[:rank]), sum(n_sizes[:rank + 1]))

    # labels=None: local query i is paired with local document i, i.e. global document off_r + i
    q, d = Q[q_rows].clone().requires_grad_(), Dd[d_rows].clone().requires_grad_()
    group = Ring() if args.strategy == "ring" else Gather()
    loss = prcl.fused_pair_bce(q, d, backend=backend, process_group=group)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)

    # one process on the concatenated batch: the same pairs as global sparse labels
    index = torch.cat([torch.arange(b) + sum(n_sizes[:r]) for r, b in enumerate(b_sizes)])[:, None]
    Qg, Dg = Q.clone().requires_grad_(), Dd.clone().requires_grad_()
    single = prcl.fused_pair_bce(Qg, Dg, torch.ones(len(index), 1, device=device), label_index=index.to(device),
                                 backend=backend)
    single.backward()
    err = torch.stack([(q.grad - Qg.grad[q_rows]).abs().max(), (d.grad - Dg.grad[d_rows]).abs().max()])
    dist.all_reduce(err, op=dist.ReduceOp.MAX)

    lines = [None] * world
    dist.all_gather_object(lines, f"rank {rank}/{world}: B_r={b_sizes[rank]} N_r={n_sizes[rank]} "
                                  f"loss_r={loss.item():.6f}")
    if rank == 0:
        print("\n".join(lines))
        print(f"{args.strategy}: Σ_r loss_r = {total.item():.6f}   one process = {single.item():.6f}   "
              f"|Δ| = {abs(total.item() - single.item()):.2e}   max |Δ grad| q {err[0].item():.2e} d {err[1].item():.2e}")
        ok = abs(total.item() - single.item()) <= 1e-5 * abs(single.item()) + 1e-6 and err.max().item() < 1e-5
        print("OK" if ok else "MISMATCH")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
