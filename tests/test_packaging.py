"""What the install exposes: prcl.kernels from the package, and no `kernels` that could stand in for
the PyPI package of that name, which transformers imports when it is installed."""
import json
import subprocess
import sys

PROBE = r"""
import importlib.util, json
import prcl.kernels.pair_bce
from transformers.utils.import_utils import is_kernels_available
spec = importlib.util.find_spec("kernels")
print(json.dumps({"kernels_is_module": spec is not None and spec.loader is not None,
                  "kernels_dirs": [] if spec is None else sorted(spec.submodule_search_locations or []),
                  "transformers_sees_kernels": is_kernels_available()}))
"""


def test_no_top_level_kernels_module(tmp_path):
    # from another directory, so that only the installed prcl (and its editable .pth) is on sys.path
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # The editable install puts the repository root on sys.path, where kernels/ (no __init__.py) can
    # only ever be an empty namespace package: it has no loader, loses to a real `kernels` anywhere on
    # sys.path, and transformers, which checks the distribution's metadata, does not count it.
    assert not r["kernels_is_module"], r
    assert r["transformers_sees_kernels"] is False, r
