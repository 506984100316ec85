"""The global-batch loss across ranks: fwd+bwd time per step and peak memory vs world size, per strategy.

    pytest benchmarks/bench_distributed.py --benchmark-only

Weak scaling on gloo (CPU): every rank holds B_LOCAL queries and N_LOCAL documents, so the global
batch, the work per rank (B_LOCAL × R·N_LOCAL pairs) and the traffic grow with the world size R.
Each world size gets one pool of spawned ranks (1 intra-op thread each) that waits for commands, so
the timed call is one step on every rank — not the process start-up. Peak memory is what one step
adds to rank 0's resident set (prcl.tools.bench's CPU meter), measured in a second pool of ranks started
with the meter's glibc setting, so that the timed pool keeps glibc's defaults: the gathered documents
for "gather", two chunks plus accumulators for "ring".
The figures land in extra_info (world, strategy, peak_mib, pairs_per_rank, device, torch version).
"""
import datetime
import os
import platform
import queue

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from prcl.tools.bench.memory import measuring_env, peak_memory

WORLDS = (1, 2, 3)
STRATEGIES = ("gather", "ring")
B_LOCAL, N_LOCAL, D = 512, 512, 128
ROUNDS, WARMUP = 8, 2


def _step(q, d, strategy):
    import prcl
    from prcl.distributed import Gather, Ring

    group = Ring() if strategy == "ring" else Gather()
    prcl.fused_pair_bce(q, d, backend="torch", process_group=group).backward()


def _serve(rank, world, store, commands, results):
    """One rank of the pool: run a step (or a measured step) per command until told to stop."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    import prcl  # noqa: F401  (import before the first timed step)

    g = torch.Generator().manual_seed(rank)
    q = torch.nn.functional.normalize(torch.randn(B_LOCAL, D, generator=g), dim=1).requires_grad_()
    d = torch.nn.functional.normalize(torch.randn(N_LOCAL, D, generator=g), dim=1).requires_grad_()
    while (command := commands[rank].get()) is not None:
        strategy, measured = command
        q.grad = d.grad = None
        peak = peak_memory(lambda: _step(q, d, strategy), "cpu") if measured else None
        if not measured:
            _step(q, d, strategy)
        results.put((rank, peak))
    dist.destroy_process_group()


class _Pool:
    def __init__(self, world, tmp):
        ctx = mp.get_context("spawn")
        self.world = world
        self.commands = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        self.procs = mp.spawn(_serve, args=(world, str(tmp / "store"), self.commands, self.results),
                              nprocs=world, join=False)

    def run(self, strategy, measured=False):
        for c in self.commands:
            c.put((strategy, measured))
        got = {}
        while len(got) < self.world:
            try:
                rank, peak = self.results.get(timeout=0.5)
                got[rank] = peak
            except queue.Empty:
                self.procs.join(timeout=0)  # re-raises a rank's exception, and stops the others
        return got

    def close(self):
        for c in self.commands:
            c.put(None)
        self.procs.join(timeout=30)


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"R{w}")
def pool(request, tmp_path_factory):
    p = _Pool(request.param, tmp_path_factory.mktemp(f"R{request.param}"))
    for strategy in STRATEGIES:  # first steps pay for imports and gloo's connections: not timed
        p.run(strategy)
    yield p
    p.close()


@pytest.fixture(scope="module")
def memory_pool(pool, tmp_path_factory):
    with measuring_env():
        p = _Pool(pool.world, tmp_path_factory.mktemp(f"R{pool.world}-memory"))
    for strategy in STRATEGIES:  # the meter measures a warm step
        p.run(strategy)
    yield p
    p.close()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_distributed_loss_step(benchmark, pool, memory_pool, strategy):
    peak = memory_pool.run(strategy, measured=True)[0]
    benchmark.group = f"distributed B_local={B_LOCAL} N_local={N_LOCAL} D={D} fp32 gloo"
    benchmark.pedantic(pool.run, args=(strategy,), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    benchmark.extra_info.update(
        world=pool.world, strategy=strategy, peak_mib=None if peak is None else round(peak / 2**20, 2),
        pairs_per_rank=B_LOCAL * N_LOCAL * pool.world, device=f"cpu ({platform.processor() or 'cpu'}, "
        f"{os.cpu_count()} cores, 1 thread per rank)", torch=torch.__version__)
