"""The PyTorch path never allocates B×N: at B = N = 20000, D = 32, the peak memory of fwd+bwd beyond
the inputs (gradients included) stays under a tenth of one B×N float32 matrix (1.5 GiB).

Measured by prcl.bench's CPU meter (resident-set growth around one warm call) in a fresh process
started with the meter's glibc setting, where it is exact; the warm-up runs on a small slice.
"""
import json
import os
import subprocess
import sys

import pytest

from prcl.bench.memory import MEASURING_ENV

SCRIPT = r"""
import json
from prcl import bench as pb
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
