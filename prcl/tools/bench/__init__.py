"""`python -m prcl bench` and the measuring helpers the pytest-benchmark suites share (benchmarks/).

    cases    inputs per label form, FLOP basis, device name, versions, free memory
    peers    the implementations compared: prcl, the eager reference, torch.compile of it, open_clip,
             siglip-kernel, the three-GEMM floor
    timing   one measured step, its timer (wall clock or CUDA events), median and spread, load average
    memory   the peak-memory meter (one per device) and the CPU worker process it needs
    table    one table row per implementation, errors vs float64, the rendered table
    cli      the command line (argparse; torch is imported only once the arguments parse)

This module imports no torch, so that `prcl bench --help` answers at once; the names below load their
module on first use (`from prcl import bench as pb; pb.make_case(...)`).
"""
import importlib
from typing import Any

LABEL_FORMS = ("diagonal", "graded", "sparse", "hardneg")
MODES = ("fwd", "fwd+bwd")
DTYPE_NAMES = ("fp32", "bf16", "fp16")

_EXPORTS = {
    "cases": ("Case", "make_case", "default_docs", "flops", "device_name", "device_slug", "versions",
              "free_bytes", "fit_problem", "GOLD_BYTES_PER_PAIR"),
    "peers": ("SCALE", "Impl", "Unsupported", "implementations", "implementation", "resolved_backend", "prcl_loss",
              "reference_loss", "compiled_reference", "open_clip_loss", "siglip_kernel_loss", "gemm_floor"),
    "timing": ("Step", "synchronize", "time_step", "rounds_for", "summarize", "spread", "load_average"),
    "memory": ("peak_memory", "memory_problem", "MEASURING_ENV", "measuring_env", "MemoryWorker",
               "measure_peak_memory"),
    "table": ("measure", "errors_vs_float64", "render"),
    "cli": ("main",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def first_line(e: object, limit: int = 160) -> str:
    """The first line of an exception's message, cut to `limit` characters: for one-line reasons."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else ""


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'prcl.tools.bench' has no attribute {name!r}")
    return getattr(importlib.import_module(f"prcl.tools.bench.{_MODULE_OF[name]}"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_MODULE_OF))
