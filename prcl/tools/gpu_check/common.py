"""What the sections share: the run's settings, the logger, an exception as one line, and the Triton
gradient forced to one design."""
import logging

import torch

from prcl.tools.bench import first_line

log = logging.getLogger("prcl.tools.gpu_check")


class Check:
    """One run's settings: device, dry run, backend."""

    def __init__(self, dry_run: bool, argv: list[str]) -> None:
        self.dry_run, self.argv = dry_run, argv
        if not dry_run and not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device here; use --dry-run to exercise it on CPU")
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.cuda = self.device.type == "cuda"
        self.backend = "triton"  # the CUDA kernels; on CPU the same kernels in Triton's interpreter

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def error_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {first_line(e, limit=300)}"
