"""What the install exposes: prcl.kernels from the package, and no `kernels` that could stand in for
the PyPI package of that name (Hugging Face's), which transformers imports when it is installed
(transformers >= 5.25 depends on it, so it may well be installed next to prcl)."""
import json
import os
import subprocess
import sys

import pytest

# argv[1]: prcl's kernel folder; argv[2] == "strip": first drop every sys.path entry under which that
# folder is a top-level `kernels` (an editable install's repository root), i.e. answer without prcl.
PROBE = r"""
import importlib.util, json, os, sys
kdir = sys.argv[1]
if sys.argv[2] == "strip":
    sys.path[:] = [p for p in sys.path if os.path.realpath(os.path.join(p or ".", "kernels")) != kdir]
else:
    import prcl.kernels.pair_bce as pb
    assert os.path.realpath(os.path.dirname(pb.__file__)) == kdir, pb.__file__
spec = importlib.util.find_spec("kernels")
files = [] if spec is None else [spec.origin] if spec.has_location else []
files += [] if spec is None else list(spec.submodule_search_locations or [])
from transformers.utils.import_utils import is_kernels_available
print(json.dumps({"files": sorted(os.path.realpath(f) for f in files if f),
                  "regular": spec is not None and spec.has_location,
                  "transformers_sees_kernels": is_kernels_available()}))
"""


def _probe(tmp_path, kdir, mode):
    # from another directory, so that only the installed prcl (or PYTHONPATH) is on sys.path
    out = subprocess.run([sys.executable, "-c", PROBE, kdir, mode], cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kernels_name_is_not_prcls(tmp_path):
    # an install (wheel or editable) maps kernels/ into the package; a bare source tree has no prcl.kernels
    pair_bce = pytest.importorskip("prcl.kernels.pair_bce", reason="prcl is not installed (a bare source tree)")
    kdir = os.path.realpath(os.path.dirname(pair_bce.__file__))
    with_prcl, without = _probe(tmp_path, kdir, "keep"), _probe(tmp_path, kdir, "strip")
    # A regular `kernels` module or package (Hugging Face's, when installed) is never prcl's folder or
    # a file in it. The editable install puts the repository root on sys.path, where kernels/ (no
    # __init__.py) can only be a namespace package: it has no file, loses to a real `kernels`
    # anywhere on sys.path, and transformers does not count it.
    if with_prcl["regular"]:
        assert not any(f == kdir or f.startswith(kdir + os.sep) for f in with_prcl["files"]), with_prcl
        assert with_prcl["files"] == without["files"], (with_prcl, without)
    # transformers sees `kernels` exactly as it would without prcl
    assert with_prcl["transformers_sees_kernels"] == without["transformers_sees_kernels"], (with_prcl, without)


# A finder ahead of every other that hides prcl.kernels: a bare source tree (PYTHONPATH=., no install)
BARE_TREE = r"""
import importlib.abc, os, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "prcl.kernels" or name.startswith("prcl.kernels."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
from prcl.backends import triton_impl
print(os.path.realpath(sys.modules["prcl.kernels.pair_bce"].__file__))
print(triton_impl.pair_tile_kernel.fn.__module__)
"""


def test_a_bare_source_tree_loads_the_kernels_from_the_top_level_folder(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", BARE_TREE], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [os.path.join(root, "kernels", "pair_bce.py"), "prcl.kernels.pair_bce"]
