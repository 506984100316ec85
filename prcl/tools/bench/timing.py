"""One measured step, its timer (wall clock or CUDA events), and how far to trust them: median, spread, load average."""
import os
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from prcl.tools.bench import MODES

if TYPE_CHECKING:
    from prcl.tools.bench.cases import Case

# an implementation's loss: fn(q, d, labels, label_index) -> the loss
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]

SPREAD_WARNING = 0.10  # IQR/median above this: the timings are noise-bound, the table says so


class Step:
    """One forward (no grad) or forward+backward of fn on the case's inputs, as a zero-arg callable.

    fwd+bwd runs on leaf views of the same storage, so the inputs are never copied; `clear()` drops
    the gradients so that a memory measurement starts from the inputs alone."""

    def __init__(self, fn: LossFn, case: "Case", mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.fn, self.case, self.mode = fn, case, mode
        self.q = case.q.detach().requires_grad_(mode == "fwd+bwd")
        self.d = case.d.detach().requires_grad_(mode == "fwd+bwd")

    def clear(self) -> None:
        self.q.grad = self.d.grad = None

    def __call__(self) -> torch.Tensor:
        c = self.case
        if self.mode == "fwd":
            with torch.no_grad():
                return self.fn(self.q, self.d, c.labels, c.label_index)
        self.clear()
        loss = self.fn(self.q, self.d, c.labels, c.label_index)
        loss.backward()
        return loss


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable[[], object], device: str | torch.device, repeats: int, warmup: int = 1,
              events: bool = False) -> list[float]:
    """Seconds of each of `repeats` calls after `warmup` untimed ones (compilation, caches): the wall
    clock around each call and a synchronize; events (CUDA): CUDA events around each call, the calls
    back to back and one synchronize at the end, so that the host's waits are not timed."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if events:
        marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in marks:
            start.record()
            step()
            end.record()
        synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in marks]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def rounds_for(seconds_per_call: float, budget_s: float, lo: int = 3, hi: int = 50) -> int:
    """How many timed rounds fit a time budget, given one call's time."""
    return max(lo, min(hi, int(budget_s / max(seconds_per_call, 1e-9))))


def summarize(times: list[float]) -> tuple[float, float]:
    """Median and interquartile range of a list of seconds."""
    if len(times) == 1:
        return times[0], 0.0
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return statistics.median(times), q3 - q1


def spread(times: list[float]) -> float:
    """Interquartile range over median: 0.05 means the middle half of the calls lie within 5%."""
    median, iqr = summarize(times)
    return iqr / median if median > 0 else 0.0


def load_average() -> tuple[float, int | None] | None:
    """(1-minute load average, CPUs this process may run on), or None where the OS does not say."""
    if not hasattr(os, "getloadavg"):
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return os.getloadavg()[0], cpus
