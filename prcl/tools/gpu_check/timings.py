"""Section 5: medians and peak memory, most wanted first (prcl.tools.bench's timer and memory meter)."""
import gc
from collections.abc import Callable
from typing import Any

import torch

from prcl.testing import DTYPES, pair_inputs
from prcl.tools.bench.cases import flops
from prcl.tools.bench.memory import peak_memory
from prcl.tools.bench.peers import SCALE
from prcl.tools.bench.timing import rounds_for, summarize, time_step
from prcl.tools.gpu_check.common import Check, error_line, log
from prcl.tools.gpu_check.peers import DESIGNS, peers


def timing_cases(ck: Check) -> list[tuple[str, int, int, int, str, str, list[str]]]:
    """(label, B, N, D, dtype, mode, implementations) in order of importance — the gradient designs that
    prcl.backends.tuning waits for, then the headline case, then the rest; the peers that take minutes to set up
    (torch.compile's first compile, open_clip) last. "gemm" is one q·dᵀ."""
    core = ["prcl", "eager", "3-GEMM floor"]
    slow_peers = [name for name, _ in peers(ck) if name not in (*DESIGNS, *core)]
    if ck.dry_run:
        return [("design D=16", 48, 48, 16, "bf16", "fwd+bwd", [*DESIGNS, "3-GEMM floor"]),
                ("main", 64, 64, 32, "bf16", "fwd+bwd", core), ("fwd vs GEMM", 64, 64, 32, "bf16", "fwd", ["prcl", "gemm"]),
                *[(f"D={D}", 48, 48, D, "bf16", "fwd+bwd", core) for D in (8, 16)],
                ("fp32", 48, 48, 16, "fp32", "fwd+bwd", core), ("main", 64, 64, 32, "bf16", "fwd+bwd", slow_peers)]
    # torch.compile and open_clip only in the main case: each new shape costs a recompile or minutes
    return [*[(f"design D={D}", 65536, 65536, D, "bf16", "fwd+bwd", [*DESIGNS, "3-GEMM floor"]) for D in (64, 128, 256)],
            ("main", 65536, 65536, 768, "bf16", "fwd+bwd", core),
            ("fwd vs GEMM", 65536, 65536, 768, "bf16", "fwd", ["prcl", "gemm"]),
            *[(f"D={D}", 32768, 32768, D, "bf16", "fwd+bwd", core) for D in (64, 256, 768, 4096)],
            ("fp32", 16384, 16384, 768, "fp32", "fwd+bwd", core),
            ("main", 65536, 65536, 768, "bf16", "fwd+bwd", slow_peers)]


def measure(ck: Check, fn: Callable[[], object], budget_s: float = 1.5) -> tuple[float, float, int, int | None]:
    """(median s, interquartile s, rounds, peak bytes beyond what was allocated before or None on CPU).
    The rounds are sized from a warm call (the first one includes compilation); CUDA events time them."""
    warm = time_step(fn, ck.device, 1)[0]
    peak = peak_memory(fn, ck.device) if ck.cuda else None
    rounds = rounds_for(warm, budget_s, hi=20)
    return *summarize(time_step(fn, ck.device, rounds, warmup=0, events=ck.cuda)), rounds, peak


def _step(fn, q, d, mode):
    q, d = q.detach().requires_grad_(mode == "fwd+bwd"), d.detach().requires_grad_(mode == "fwd+bwd")

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return fn(q, d, None, None)
        q.grad = d.grad = None
        fn(q, d, None, None).backward()

    return step


def section(ck: Check, rec: dict[str, Any]) -> None:
    rec["timer"] = "CUDA events" if ck.cuda else "wall clock (dry run: not a measurement)"
    rec["memory"] = ("peak allocated during one step beyond what was allocated before it: the inputs and, "
                     "after the warm-up step, their gradients" if ck.cuda else "n/a on CPU")
    rec["scale"] = SCALE
    rows = rec["rows"] = []
    factories = dict(peers(ck))
    for label, B, N, D, dtype, mode, names in timing_cases(ck):
        q, d, _ = pair_inputs(B, N, D, DTYPES[dtype], device=ck.device)
        for name in names:
            row = dict(case=label, B=B, N=N, D=D, dtype=dtype, mode=mode, impl=name)
            rows.append(row)
            try:
                fn = (lambda a, b, labels, label_index: a @ b.T) if name == "gemm" else factories[name]()
                median, iqr, rounds, peak = measure(ck, _step(fn, q, d, mode))
                row.update(ms=median * 1e3, iqr_ms=iqr * 1e3, rounds=rounds, tflops=flops(B, N, D, mode) / median / 1e12,
                           peak_gib=None if peak is None else peak / 2**30)
            except Exception as e:  # noqa: BLE001 (a peer missing, unable to take the case, or out of memory)
                row["error"] = error_line(e)
            finally:
                fn = None
                gc.collect()
                if ck.cuda:
                    torch.cuda.empty_cache()
            log.info("timing %s", row)
