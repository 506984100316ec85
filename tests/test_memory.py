"""Peak memory of fwd+bwd beyond the inputs (gradients included), measured by prcl.tools.bench's CPU meter
(resident-set growth around one warm call) in a process started with the meter's glibc setting, where
it is exact:

- the PyTorch path never allocates B×N: at B = N = 20000, D = 32, it stays under a tenth of one B×N
  float32 matrix (1.5 GiB);
- where the native kernel is prcl's backend, prcl's peak is at most eager's at every size the
  benchmarks cover (`python -m prcl bench`'s default case, the CPU sweep of benchmarks/bench_loss.py
  and the sizes of benchmarks/bench_native.py), in every dtype and label form, forward and
  forward+backward.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prcl.backends import native
from prcl.tools import bench as pb
from prcl.tools.bench.cli import parser
from prcl.tools.bench.memory import MEASURING_ENV, MemoryWorker, impl_step

SCRIPT = r"""
import json
from prcl.tools import bench as pb
case = pb.make_case(20000, 20000, 32)
pb.Step(pb.prcl_loss("torch"), pb.make_case(64, 64, 32), "fwd+bwd")()  # warm-up: first-call allocations
step = pb.Step(pb.prcl_loss("torch"), case, "fwd+bwd")
print(json.dumps({"growth_mb": pb.peak_memory(step, "cpu") / 2**20, "bxn_mb": case.B * case.N * 4 / 2**20}))
"""


@pytest.mark.slow
def test_torch_path_memory_is_bounded():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True,
                         env={**os.environ, **MEASURING_ENV})
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(r)
    assert 0 < r["growth_mb"] < r["bxn_mb"] / 10, r


def _benchmark_module(name):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"prcl_test_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def benchmark_sizes():
    """(B, N, D, label form) of every case the CPU benchmarks run, in any dtype."""
    cli = parser().parse_args([])
    sweep = _benchmark_module("bench_loss").SWEEPS["cpu"]
    square = {(cli.batch, cli.dim)}
    square |= {(B, D) for B in sweep["batch"] for D in sweep["dim"]}
    bench_native = _benchmark_module("bench_native")
    square |= {(B, D) for B in bench_native.BATCHES for D in bench_native.DIMS}
    sizes = [(B, B, D, form) for B, D in sorted(square) for form in pb.LABEL_FORMS if form != "hardneg"]
    sizes += [(B, pb.default_docs(B, "hardneg"), D, "hardneg") for B in sweep["hardneg_batch"] for D in sweep["dim"]]
    return sizes


@pytest.mark.slow
@pytest.mark.skipif(pb.resolved_backend("cpu") != "native",
                    reason=f"prcl's CPU backend is not the native kernel: {native.status()}")
@pytest.mark.parametrize("dtype", pb.DTYPE_NAMES)
def test_native_peak_memory_is_at_most_eagers(dtype):
    worker = MemoryWorker()
    over, lines = [], []
    try:
        for B, N, D, form in benchmark_sizes():
            spec = {"B": B, "N": N, "D": D, "dtype": dtype, "label_form": form, "seed": 0}
            for mode in pb.MODES:
                peak = {}
                for name in ("prcl", "eager"):
                    peak[name], why = worker.measure(impl_step, name, spec, mode)
                    assert why is None, (spec, mode, name, why)
                line = f"B{B} N{N} D{D} {form} {mode}: prcl {peak['prcl'] / 2**20:.2f} MiB, " \
                       f"eager {peak['eager'] / 2**20:.2f} MiB"
                lines.append(line)
                if peak["prcl"] > peak["eager"]:
                    over.append(line)
    finally:
        worker.close()
    print("\n".join(lines))
    assert not over, "prcl's peak exceeds eager's:\n" + "\n".join(over)
