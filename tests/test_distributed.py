"""prcl.distributed on CPU with gloo: R ranks against one process on the concatenated batch.

    Σ_r loss_r == fused_pair_bce(cat q, cat d, Y_global);  q_r.grad, d_r.grad == the one-process rows

Spawning a process group costs seconds on a 2-core machine, so each spawned group runs many checks
(every strategy × label form × reduction) and a failing check names its case. Every process group
has a short collective timeout, and the parent gives up on a group after LIMIT_S: nothing can hang.
"""
import datetime
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import prcl
from prcl.distributed import Gather, Ring, ddp_loss_scale, distributed_pair_bce

TIMEOUT_S = 20  # collective timeout inside the groups
LIMIT_S = 240  # the parent's limit for one spawned group (a loaded 2-core machine took 120 s)
D = 7
FORMS = ("diag", "graded", "dense", "sparse")
REDUCTIONS = ("mean", "sum", "none")


# --- harness ---------------------------------------------------------------------------------------

def _init(rank, world, store, timeout_s=TIMEOUT_S):
    torch.set_num_threads(1)  # several ranks share 2 cores
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _spawn(fn, world, tmp_path, *args):
    """Runs fn(rank, world, store, *args) on `world` processes; a rank that raises fails the test."""
    ctx = mp.spawn(fn, args=(world, str(tmp_path / "store"), *args), nprocs=world, join=False)
    deadline = time.monotonic() + LIMIT_S
    try:
        while not ctx.join(timeout=0.5):  # raises ProcessRaisedException (and kills the rest) on failure
            if time.monotonic() > deadline:
                pytest.fail(f"process group of {world} did not finish within {LIMIT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


# --- data: the global batch, and each rank's slice of it ------------------------------------------

def _global_batch(b_sizes, n_sizes, form, seed):
    """Q, Dd and the one-process dense label matrix Y, plus each rank's local labels."""
    g = torch.Generator().manual_seed(seed)
    Q = F.normalize(torch.randn(sum(b_sizes), D, generator=g), dim=1)
    Dd = F.normalize(torch.randn(sum(n_sizes), D, generator=g), dim=1)
    Y = torch.zeros(sum(b_sizes), sum(n_sizes))
    local = []
    boff = noff = 0
    for B, N in zip(b_sizes, n_sizes):
        rows, cols = slice(boff, boff + B), slice(noff, noff + N)
        if form == "diag":
            Y[rows, cols][range(B), range(B)] = 1.0
            local.append((None, None))
        elif form == "graded":
            y = torch.rand(B, generator=g)
            y[B // 2] = -1.0  # an excluded pair
            Y[rows, cols][range(B), range(B)] = y
            local.append((y, None))
        elif form == "dense":
            y = torch.rand(B, N, generator=g) * (torch.rand(B, N, generator=g) < 0.4)
            y[0, N - 1] = -1.0
            Y[rows, cols] = y
            local.append((y, None))
        else:  # sparse: K = 3 local document rows per query, −1 padding, one exclusion
            index = torch.stack([torch.randperm(N, generator=g)[:3] for _ in range(B)])
            index[B - 1, 2] = -1
            y = torch.rand(B, 3, generator=g)
            y[0, 1] = -1.0
            for i in range(B):
                for k in range(3):
                    if index[i, k] >= 0:
                        Y[boff + i, noff + index[i, k]] = y[i, k]
            local.append((y, index))
        boff, noff = boff + B, noff + N
    return Q, Dd, Y, local


def _one_process(Q, Dd, Y, scale, bias, reduction, weights, margin=None):
    Q, Dd = Q.clone().requires_grad_(), Dd.clone().requires_grad_()
    t = torch.tensor(scale, requires_grad=True)
    b = None if bias is None else torch.tensor(bias, requires_grad=True)
    out, masked = prcl.fused_pair_bce(Q, Dd, Y, scale=t, bias=b, reduction=reduction, backend="torch",
                                      false_negative_margin=margin, return_masked=True)
    out.backward(weights if reduction == "none" else None)
    return out.detach(), Q.grad, Dd.grad, t.grad, None if b is None else b.grad, masked


def _close(got, want, what):
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6, msg=lambda m: f"{what}: {m}")


def _sum_over_ranks(x):
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def _check_case(rank, b_sizes, n_sizes, form, reduction, strategy, bias, seed, margin=None):
    case = f"rank{rank}-B{b_sizes}-N{n_sizes}-{form}-{reduction}-{strategy}-bias{bias}-margin{margin}"
    Q, Dd, Y, local = _global_batch(b_sizes, n_sizes, form, seed)
    weights = torch.rand(sum(b_sizes), generator=torch.Generator().manual_seed(seed + 1))
    want = _one_process(Q, Dd, Y, 10.0, bias, reduction, weights, margin)

    boff, noff = sum(b_sizes[:rank]), sum(n_sizes[:rank])
    rows, cols = slice(boff, boff + b_sizes[rank]), slice(noff, noff + n_sizes[rank])
    q, d = Q[rows].clone().requires_grad_(), Dd[cols].clone().requires_grad_()
    t = torch.tensor(10.0, requires_grad=True)
    b = None if bias is None else torch.tensor(bias, requires_grad=True)
    labels, index = local[rank]
    group = {"gather": dist.group.WORLD, "ring": Ring()}[strategy]
    out, masked = prcl.fused_pair_bce(q, d, labels, label_index=index, scale=t, bias=b, reduction=reduction,
                                      backend="torch", process_group=group, false_negative_margin=margin,
                                      return_masked=True)
    out.backward(weights[rows] if reduction == "none" else None)

    loss, gq, gd, gt, gb, want_masked = want
    assert _sum_over_ranks(masked).item() == want_masked.item(), f"{case}: masked pairs"
    assert margin is None or want_masked.item() > 0, f"{case}: the mask left every pair in"
    if reduction == "none":
        _close(out.detach(), loss[rows], f"{case} rows")
    else:
        _close(_sum_over_ranks(out), loss, f"{case} Σ_r loss_r")
    _close(q.grad, gq[rows], f"{case} q.grad")
    _close(d.grad, gd[cols], f"{case} d.grad")
    _close(_sum_over_ranks(t.grad), gt, f"{case} Σ_r scale.grad")
    if bias is not None:
        _close(_sum_over_ranks(b.grad), gb, f"{case} Σ_r bias.grad")


def _check_data_parallel(rank, b_sizes, n_sizes, wrapper, strategy):
    """DDP and FSDP2 average gradients over the ranks; the loss times ddp_loss_scale gives exactly
    the one-process encoder gradient of the global loss."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    g = torch.Generator().manual_seed(5)
    Xq, Xd = torch.randn(sum(b_sizes), 5, generator=g), torch.randn(sum(n_sizes), 5, generator=g)
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(5, D))
    reference = torch.nn.Sequential(torch.nn.Linear(5, D))
    reference.load_state_dict(encoder.state_dict())
    model = DistributedDataParallel(encoder) if wrapper == "DDP" else fully_shard(encoder)
    boff, noff = sum(b_sizes[:rank]), sum(n_sizes[:rank])
    xq, xd = Xq[boff:boff + b_sizes[rank]], Xd[noff:noff + n_sizes[rank]]
    emb = model(torch.cat([xq, xd]))  # one forward per step, as DDP expects
    q, d = emb.split([len(xq), len(xd)])
    group = Ring() if strategy == "ring" else Gather()
    loss = prcl.fused_pair_bce(q, d, backend="torch", process_group=group) * ddp_loss_scale(group)
    loss.backward()

    Y = torch.zeros(sum(b_sizes), sum(n_sizes))
    for r in range(len(b_sizes)):
        for i in range(b_sizes[r]):
            Y[sum(b_sizes[:r]) + i, sum(n_sizes[:r]) + i] = 1.0
    emb = reference(torch.cat([Xq, Xd]))
    prcl.fused_pair_bce(emb[: len(Xq)], emb[len(Xq):], Y, backend="torch").backward()
    for (name, p), ref in zip(encoder.named_parameters(), reference.parameters()):
        grad = p.grad.full_tensor() if wrapper == "FSDP2" else p.grad  # FSDP2 shards it as a DTensor
        _close(grad, ref.grad, f"{wrapper}-{strategy} rank{rank} {name}.grad")


def _check_bf16(rank, group):
    """bf16 inputs: gradients come back in bf16; the document gradient is reduced in float32."""
    Q, Dd, Y, local = _global_batch([3, 5], [4, 7], "sparse", 3)
    Q, Dd = Q.bfloat16(), Dd.bfloat16()
    want = _one_process(Q, Dd, Y, 10.0, None, "mean", None)
    rows, cols = (slice(0, 3), slice(0, 4)) if rank == 0 else (slice(3, 8), slice(4, 11))
    q, d = Q[rows].clone().requires_grad_(), Dd[cols].clone().requires_grad_()
    out = prcl.fused_pair_bce(q, d, local[rank][0], label_index=local[rank][1], scale=10.0, backend="torch",
                              process_group=group)
    out.backward()
    assert q.grad.dtype == d.grad.dtype == torch.bfloat16
    close = dict(rtol=2e-2, atol=2e-3)  # bf16 rounding of per-rank pieces vs one rounding
    torch.testing.assert_close(_sum_over_ranks(out), want[0], **close)
    torch.testing.assert_close(q.grad.float(), want[1][rows].float(), **close)
    torch.testing.assert_close(d.grad.float(), want[2][cols].float(), **close)


def _check_stalled_rank_times_out(rank, timeout_s=2):
    """A rank that never joins: the others' collective raises after the group's timeout, no hang."""
    short = dist.new_group(timeout=datetime.timedelta(seconds=timeout_s))
    if rank == 1:
        time.sleep(timeout_s + 1)
    else:
        start = time.monotonic()
        with pytest.raises(RuntimeError):  # gloo's timeout (DistBackendError is a RuntimeError)
            prcl.fused_pair_bce(torch.randn(3, D), torch.randn(3, D), backend="torch", process_group=short)
        assert time.monotonic() - start < timeout_s + 10


def _check_rejections(rank):
    q, d = torch.randn(3, D), torch.randn(4, D)
    # one rank's bad labels: it raises its own ValueError, every other rank one that names it
    bad = torch.full((3,), 2.0 if rank == 1 else 0.5)
    with pytest.raises(ValueError, match="labels: values must lie" if rank == 1 else r"rank\(s\) \[1\]"):
        distributed_pair_bce(q, d, bad, process_group=None)
    # ranks that disagree on the strategy would wait for different messages: all refuse
    with pytest.raises(ValueError, match="disagree on strategy"):
        distributed_pair_bce(q, d, strategy="ring" if rank == 0 else "gather")
    with pytest.raises(ValueError, match="contradicts"):
        distributed_pair_bce(q, d, process_group=Ring(), strategy="gather")
    # ranks that disagree on scale or bias would each return a plausible number: all refuse
    with pytest.raises(ValueError, match=r"disagree on scale \(scale per rank: \[10.0, 12.0\]\)"):
        distributed_pair_bce(q, d, scale=10.0 if rank == 0 else 12.0)
    with pytest.raises(ValueError, match="disagree on bias"):
        distributed_pair_bce(q, d, bias=torch.tensor(-2.0 - rank))
    with pytest.raises(ValueError, match=r"disagree on bias \(None on some ranks only\)"):
        distributed_pair_bce(q, d, bias=None if rank == 0 else -3.0)
    dist.barrier()


def _worker(rank, world, store, b_sizes, n_sizes, extras):
    _init(rank, world, store)
    seed = 0
    for strategy in ("gather", "ring"):
        for form in FORMS:
            for reduction in REDUCTIONS:
                seed += 10
                bias = None if reduction == "sum" else -2.5  # None: −log(N−1) with the global N
                _check_case(rank, b_sizes, n_sizes, form, reduction, strategy, bias, seed)
            for reduction in ("mean", "none"):  # the false-negative mask: thresholds from the rank's own pairs
                seed += 10
                _check_case(rank, b_sizes, n_sizes, form, reduction, strategy, -2.5, seed, margin=0.05)
    if extras:
        # equal sizes: labels=None on the ranks is labels=None on the concatenation
        Q, Dd, _, _ = _global_batch([4] * world, [4] * world, "diag", 1)
        for group in (Gather(), Ring()):
            out = prcl.fused_pair_bce(Q[4 * rank:4 * rank + 4], Dd[4 * rank:4 * rank + 4], backend="torch",
                                      process_group=group)
            _close(_sum_over_ranks(out), prcl.fused_pair_bce(Q, Dd, backend="torch"), f"equal sizes {group}")
            with torch.no_grad():  # forward only, inputs that require grad: no gradient ring
                out = prcl.fused_pair_bce(Q[4 * rank:4 * rank + 4].requires_grad_(), Dd[4 * rank:4 * rank + 4],
                                          backend="torch", process_group=group)
            _close(_sum_over_ranks(out), prcl.fused_pair_bce(Q, Dd, backend="torch"), f"no_grad {group}")
        for wrapper in ("DDP", "FSDP2"):
            for strategy in ("gather", "ring"):
                _check_data_parallel(rank, b_sizes, n_sizes, wrapper, strategy)
        for group in (Gather(), Ring()):
            _check_bf16(rank, group)
        _check_rejections(rank)
        _check_stalled_rank_times_out(rank)
    dist.destroy_process_group()


@pytest.mark.parametrize("world, b_sizes, n_sizes, extras", [
    pytest.param(2, [3, 5], [4, 7], True, id="R2-B3,5-N4,7"),
    pytest.param(3, [2, 4, 3], [5, 4, 6], False, id="R3-B2,4,3-N5,4,6", marks=pytest.mark.slow),
])
def test_ranks_match_one_process(tmp_path, world, b_sizes, n_sizes, extras):
    _spawn(_worker, world, tmp_path, b_sizes, n_sizes, extras)


def _raising_worker(rank, world, store, timeout_s):
    _init(rank, world, store, timeout_s)
    if rank == 1:
        raise RuntimeError("rank 1 failed before the loss")
    q, d = torch.randn(3, D), torch.randn(3, D)
    prcl.fused_pair_bce(q, d, backend="torch", process_group=Ring())  # waits for rank 1


def test_a_raising_rank_fails_promptly(tmp_path):
    """The failure reaches the test long before the collective timeout (kept long here on purpose)."""
    timeout_s = 120
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 failed"):
        _spawn(_raising_worker, 2, tmp_path, timeout_s)
    assert time.monotonic() - start < timeout_s / 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_one_rank_gather_rounds_gradients_once(tmp_path, dtype):
    """The gather strategy's global mean enters the op, as in one process: with one rank the 16-bit
    gradients equal the plain call's bitwise (a division after the op would round them twice)."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        gen = torch.Generator().manual_seed(0)
        q, d = torch.randn(37, 19, generator=gen).to(dtype), torch.randn(53, 19, generator=gen).to(dtype)
        grads = []
        for group in (dist.group.WORLD, None):
            qg, dg = q.clone().requires_grad_(), d.clone().requires_grad_()
            prcl.fused_pair_bce(qg, dg, backend="torch", process_group=group).backward()
            grads.append((qg.grad, dg.grad))
        (q_dist, d_dist), (q_one, d_one) = grads
        assert torch.equal(q_dist, q_one) and torch.equal(d_dist, d_one)
    finally:
        dist.destroy_process_group()
