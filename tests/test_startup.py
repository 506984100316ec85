"""Start-up: `prcl --help` and `prcl bench --help` answer without importing torch, and `import prcl`
pulls in nothing heavy (torch only on first use of the loss, never transformers or torch._dynamo)."""
import json
import subprocess
import sys

import pytest

REPORT = """
import json, resource, sys
{code}
used = resource.getrusage(resource.RUSAGE_SELF)
watched = ("torch", "torch._dynamo", "transformers", "triton", "numpy")
print(json.dumps({{"modules": sorted(m for m in watched if m in sys.modules),
                   "cpu_s": used.ru_utime + used.ru_stime}}))
"""


def _run(code):
    done = subprocess.run([sys.executable, "-c", REPORT.format(code=code)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"]], ids=["prcl", "prcl-bench"])
def test_help_answers_without_torch(argv):
    out, r = _run(f"from prcl.__main__ import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass")
    assert "usage:" in out and "bench" in out
    assert r["modules"] == [], r
    # CPU seconds, not wall time: on a shared machine the wait for a core is not start-up cost
    assert r["cpu_s"] < 1.0, r


def test_bench_argument_errors_name_the_option():
    done = subprocess.run([sys.executable, "-m", "prcl", "bench", "--dtype", "fp64"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "invalid choice: 'fp64'" in done.stderr


def test_import_prcl_is_light_and_the_loss_never_imports_transformers():
    _, r = _run("import prcl")
    assert r["modules"] == [], r
    # forward and backward: the first call imports neither transformers nor torch._dynamo (~3 s)
    _, r = _run("import torch, prcl\nq = torch.randn(4, 8, requires_grad=True)\n"
                "prcl.fused_pair_bce(q, torch.randn(5, 8)).backward()")
    assert "torch" in r["modules"] and "transformers" not in r["modules"] and "torch._dynamo" not in r["modules"], r
