"""Peak memory beyond what is live before a call (the inputs): one meter per device.

CUDA: `max_memory_allocated` during the call minus `memory_allocated` before it.
CPU:  resident-set growth, VmHWM after the call minus VmRSS before it, with VmHWM reset by writing 5
      to /proc/self/clear_refs. It sees every allocation (ATen's, a native kernel's own buffers, the
      BLAS's), where tracemalloc sees none of ATen's and torch's profiler none outside its allocator.
      It is exact only in a process whose glibc maps every large block with mmap and unmaps it on
      free (MEASURING_ENV, read by glibc at process start): with the default, dynamic threshold,
      freed blocks stay in the heap and the same eager call read 80 to 130 MiB depending on what ran
      before it. MemoryWorker is such a process, so that the timed one keeps glibc's defaults.
Gradients a step leaves behind count: the step allocates them.
"""
import ctypes
import gc
import multiprocessing
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from prcl.tools.bench import first_line
from prcl.tools.bench.cases import Case, make_case
from prcl.tools.bench.peers import Unsupported, implementation
from prcl.tools.bench.timing import Step, synchronize

# glibc maps blocks above 128 KiB with mmap and unmaps them on free, so RSS follows live tensors; the
# variable also switches off the dynamic threshold that otherwise rises to the largest freed block.
MEASURING_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 17)}


def _proc_status(key):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def memory_problem(device: str | torch.device) -> str | None:
    """None when this process can measure peak memory on `device`, else why it cannot."""
    if torch.device(device).type == "cuda":
        return None
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status("VmHWM")
    except (OSError, AttributeError) as e:
        return f"the CPU memory meter needs Linux's /proc/self/clear_refs and VmHWM ({type(e).__name__})"
    missing = {k: v for k, v in MEASURING_ENV.items() if os.environ.get(k) != v}
    if missing:
        return (f"the CPU memory meter needs a process started with {missing} "
                "(prcl.tools.bench.memory.MemoryWorker is one)")
    return None


def peak_memory(step: Callable[[], object], device: str | torch.device) -> int:
    """Bytes allocated beyond what is live before one call of step, at the call's peak."""
    device = torch.device(device)
    problem = memory_problem(device)
    if problem:
        raise RuntimeError(problem)
    if hasattr(step, "clear"):
        step.clear()
    if device.type == "cuda":
        gc.collect()  # on CPU tensors die by reference count; a full collection there took seconds
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _proc_status("VmRSS")
    step()
    return max(0, _proc_status("VmHWM") - base)


@contextmanager
def measuring_env() -> Iterator[None]:
    """MEASURING_ENV in os.environ while processes that the meter will run in are started."""
    saved = {k: os.environ.get(k) for k in MEASURING_ENV}
    os.environ.update(MEASURING_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


_cases, _fns = {}, {}


def impl_step(name: str, spec: dict[str, Any], mode: str) -> Step:
    """The Step of implementation `name` on the CPU case `spec`, for MemoryWorker; the last case and
    every implementation are kept, so that a sweep builds each once (and compiles once)."""
    key = tuple(sorted(spec.items()))
    if key not in _cases:
        _cases.clear()
        gc.collect()
        _cases[key] = make_case(device="cpu", **spec)
    if name not in _fns:
        fn, reason = implementation(name, "cpu").make()
        if fn is None:
            raise Unsupported(reason)
        _fns[name] = fn
    return Step(_fns[name], _cases[key], mode)


def _serve(conn):
    """MemoryWorker's process: (factory, args, threads) -> ("ok", bytes) or ("error", reason)."""
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        factory, args, threads = request
        try:
            torch.set_num_threads(threads)
            step = factory(*args)
            step()  # warm-up: compilation, thread pools and lazy initialisation are not the step's
            conn.send(("ok", peak_memory(step, "cpu")))
            if hasattr(step, "clear"):
                step.clear()
        except Exception as e:  # noqa: BLE001 (report, keep serving)
            conn.send(("error", f"{type(e).__name__}: {first_line(e)}"))


class MemoryWorker:
    """Peak CPU memory of a step, measured in a separate, long-lived process started with
    MEASURING_ENV. Long-lived, so that a sweep pays for starting torch once, not per case. The step
    comes from `factory(*args)`, run in the worker: factory must be importable there by name."""

    def __init__(self) -> None:
        self._proc = self._conn = None

    def _start(self):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        with measuring_env():
            self._proc = ctx.Process(target=_serve, args=(child,), daemon=True)
            self._proc.start()
        child.close()

    def measure(self, factory: Callable[..., Callable[[], object]], *args: object,
                timeout_s: float = 600) -> tuple[int | None, str | None]:
        """(bytes, None) or (None, reason)."""
        if self._proc is None or not self._proc.is_alive():
            self._start()
        try:
            self._conn.send((factory, args, torch.get_num_threads()))
            if not self._conn.poll(timeout_s):
                raise TimeoutError(f"no answer in {timeout_s} s")
            status, value = self._conn.recv()
        except (EOFError, OSError, TimeoutError) as e:
            self.close()
            return None, f"memory worker died ({type(e).__name__}: {first_line(e)}; out of memory?)"
        return (value, None) if status == "ok" else (None, value)

    def close(self) -> None:
        if self._proc is not None:
            try:
                self._conn.send(None)
            except (OSError, BrokenPipeError):
                pass
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
            self._proc = None


_worker = None


def measure_peak_memory(name: str, step: Step, case: Case) -> tuple[int | None, str | None]:
    """Peak memory beyond the inputs of one warm call of implementation `name` on `case`:
    (bytes, None) or (None, reason). CUDA measures `step` in place; CPU asks the memory worker."""
    global _worker
    if case.device.type == "cuda":
        return peak_memory(step, case.device), None
    if _worker is None:
        import atexit

        _worker = MemoryWorker()
        atexit.register(_worker.close)
    return _worker.measure(impl_step, name, case.spec(), step.mode)
