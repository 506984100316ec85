"""The PyTorch path never allocates B×N: at B = N = 20000, D = 32, peak RSS growth of fwd+bwd stays
under a tenth of one B×N float32 matrix (1.5 GiB).

Measured in a fresh process (ru_maxrss is a high-water mark; ATen allocations are invisible to
tracemalloc), with the inputs, their gradients and a small warm-up call done before the baseline is read.
"""
import json
import subprocess
import sys

SCRIPT = r"""
import json, resource, torch, prcl
torch.manual_seed(0)
B = N = 20000
q = torch.nn.functional.normalize(torch.randn(B, 32), dim=1).requires_grad_()
d = torch.nn.functional.normalize(torch.randn(N, 32), dim=1).requires_grad_()
q.grad = torch.zeros_like(q); d.grad = torch.zeros_like(d)
prcl.fused_pair_bce(q[:64], d[:64], backend="torch").backward()  # warm-up: first-call allocations
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prcl.fused_pair_bce(q, d, backend="torch").backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_mb": (after - before) / 1024, "bxn_mb": B * N * 4 / 2**20}))
"""


def test_torch_path_memory_is_bounded():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(r)
    assert r["growth_mb"] < r["bxn_mb"] / 10, r
