"""The native CPU kernel beside the PyTorch path and the eager reference: `pytest benchmarks/bench_native.py
--benchmark-only` (collected with the rest by `pytest benchmarks/ --benchmark-only`).

One pytest-benchmark group per case (B = N, D, mode), fp32, diagonal labels, on CPU; in each group,
measured in the same run: the eager reference (prcl.backends.reference.pair_bce, the tests' oracle), prcl's
PyTorch path (backend="torch") and the native kernel (backend="native"). Default sweep: B = N ∈
{1024, 2048}, D ∈ {32, 64, 256, 768}, a few minutes on 2 cores; PRCL_BENCH_LARGE=1 adds 4096 to 16384
(the eager reference alone then needs ~24 B per pair: 6 GiB at 16384²; cases that cannot fit skip).

extra_info: median and IQR in ms, TFLOP/s on 2·B·N·D (fwd) or 6·B·N·D (fwd+bwd), peak memory of
one warm call beyond its inputs (peak_bytes; fwd+bwd includes the gradients) from prcl.tools.bench's memory
meter (resident-set growth in a worker process, prcl/tools/bench/memory.py says why) and, on the native entry, its speed-up over the
other two measured just before it. test_memory_target runs the issue's memory case (B = N = 20000,
D = 32, fwd+bwd) in a fresh process. The device name, thread count, load average
and versions are recorded: on a shared machine, read the medians beside the load.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from prcl.backends import native
from prcl.tools import bench as pb

LARGE = os.environ.get("PRCL_BENCH_LARGE") == "1"
BATCHES = [1024, 2048, 4096, 8192, 16384] if LARGE else [1024, 2048]
DIMS = [32, 64, 256, 768]
MODES = ["fwd", "fwd+bwd"]
IMPLS = {  # measured in this order within a group: the speed-ups on the native entry need the others
    "eager": (lambda: pb.reference_loss, 24),
    "torch": (lambda: pb.prcl_loss("torch"), 0),
    "native": (lambda: pb.prcl_loss("native"), 0),
}
BUDGET_S = 0.4  # seconds of timed calls per entry, at least 5 rounds

_medians = {}  # (B, D, mode) -> {impl: median seconds}
_last_case = {}


def _case(B, D):
    key = (B, D)
    if key not in _last_case:
        _last_case.clear()
        _last_case[key] = pb.make_case(B, B, D, "fp32", "cpu", "diagonal")
    return _last_case[key]


def _probe_name(impl):
    """prcl.tools.bench's memory worker names implementations by role: map ours onto its names."""
    if impl == "eager":
        return "eager"
    return "prcl" if impl == pb.resolved_backend("cpu") else "prcl-torch"


def _entries():
    for B in BATCHES:
        for D in DIMS:
            for mode in MODES:
                for impl in IMPLS:
                    yield pytest.param(B, D, mode, impl, id=f"B{B}-N{B}-D{D}-fp32-{mode}-{impl}")


@pytest.mark.parametrize("B, D, mode, impl", list(_entries()))
def test_native(benchmark, B, D, mode, impl):
    benchmark.group = f"native-B{B}-N{B}-D{D}-fp32-{mode}"
    if impl == "native" and not native.available():
        pytest.skip(f"native CPU kernel unavailable: {native.status()}")
    factory, bytes_per_pair = IMPLS[impl]
    problem = pb.fit_problem(impl, bytes_per_pair, B, B, "cpu")
    if problem:
        pytest.skip(problem)
    case = _case(B, D)
    step = pb.Step(factory(), case, mode)
    try:
        first = pb.time_step(step, "cpu", repeats=1, warmup=1)[0]
        benchmark.pedantic(step, rounds=pb.rounds_for(first, BUDGET_S, lo=5), iterations=1, warmup_rounds=0)
    finally:
        step.clear()
    peak, why = pb.measure_peak_memory(_probe_name(impl), step, case)
    stats = benchmark.stats.stats
    median = stats.median
    medians = _medians.setdefault((B, D, mode), {})
    medians[impl] = median
    work = pb.flops(B, B, D, mode)
    v = pb.versions()
    info = {
        "impl": impl, "B": B, "N": B, "D": D, "dtype": "fp32", "label_form": "diagonal", "mode": mode,
        "median_ms": median * 1e3, "iqr_ms": stats.iqr * 1e3, "flops": work, "tflops": work / median / 1e12,
        "peak_bytes": peak, "peak_note": why, "input_bytes": case.input_bytes(),
        "device": "cpu", "device_name": pb.device_name("cpu"), "threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "native_status": native.status(), "prcl_version": v["prcl"], "torch_version": v["torch"],
    }
    if impl == "native":
        for other in ("eager", "torch"):
            if other in medians:
                info[f"speedup_vs_{other}"] = medians[other] / median
    benchmark.extra_info.update(info)


# A fresh process started with prcl.tools.bench's MEASURING_ENV, where its CPU memory meter (peak_memory: VmHWM
# reset around one warm call) is exact. ru_maxrss cannot be reset, and importing torch alone peaks
# above this call's growth: it read 0 MB here.
MEMORY_TARGET = """
    import json, time, torch, prcl
    from prcl.tools import bench as pb
    case = pb.make_case(20000, 20000, 32, "fp32", "cpu", "diagonal")
    step = pb.Step(pb.prcl_loss("native"), case, "fwd+bwd")
    step()  # warm-up: first-call allocations, thread pool
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    print(json.dumps({"growth_mb": pb.peak_memory(step, "cpu") / 2**20, "seconds": seconds}))
"""


def run_memory_target():
    env = {**os.environ, **pb.MEASURING_ENV}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(MEMORY_TARGET)], capture_output=True, text=True,
                         check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_memory_target(benchmark):
    """B = N = 20000, D = 32, fp32 fwd+bwd: peak RSS growth (target < 100 MB; B×N fp32 is 1.5 GiB)."""
    benchmark.group = "native-memory-B20000-N20000-D32-fp32-fwd+bwd"
    if not native.available():
        pytest.skip(f"native CPU kernel unavailable: {native.status()}")
    results = []

    def fresh_process():
        results.append(run_memory_target())

    # the timing is the whole process (start-up included); the call's own time is in extra_info
    benchmark.pedantic(fresh_process, rounds=1, iterations=1, warmup_rounds=0)
    r = results[-1]
    benchmark.extra_info.update({
        "impl": "native", "B": 20000, "N": 20000, "D": 32, "mode": "fwd+bwd",
        "peak_rss_growth_mb": r["growth_mb"], "call_seconds": r["seconds"],
        "device_name": pb.device_name("cpu"), "threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    })
    print(f"\nnative B=N=20000 D=32 fwd+bwd: peak RSS growth {r['growth_mb']:.1f} MB, {r['seconds']:.2f} s")
