"""Start-up: `prcl --help` and `prcl bench --help` answer without importing torch, and `import prcl`
pulls in nothing heavy (torch only on first use of the loss, never transformers)."""
import json
import subprocess
import sys

import pytest

REPORT = """
import json, resource, sys
{code}
used = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({{"modules": sorted(m for m in ("torch", "transformers", "triton", "numpy") if m in sys.modules),
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
    _, r = _run("import torch, prcl\nprcl.fused_pair_bce(torch.randn(4, 8), torch.randn(5, 8))")
    assert "transformers" not in r["modules"] and "torch" in r["modules"], r
