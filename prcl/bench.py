"""`python -m prcl bench`: prcl.fused_pair_bce against the eager reference on whatever device is present.

For each implementation: forward-only and forward+backward median time (with spread), TFLOP/s on the
2·B·N·D / 6·B·N·D basis, peak memory beyond the inputs, and the error of the loss and of the gradients
against float64 (prcl.reference on float64 inputs, the same oracle the tests use).

The measuring helpers below (inputs per label form, the implementations under test, timing, peak
memory, device name, FLOP counts, fit estimates) are also what benchmarks/bench_loss.py imports:
the CLI and the pytest-benchmark suite measure the same way, from one place.
"""
import argparse
import ctypes
import gc
import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import prcl
from prcl import reference
from prcl.contract import check_inputs, default_bias

LABEL_FORMS = ("diagonal", "graded", "sparse", "hardneg")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCALE = 10.0
SPARSE_K = 4
HARDNEG_FACTOR = 8

# ---------------------------------------------------------------------------------------------------
# Device, versions, FLOPs


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        model = found.group(1).strip() if found else model
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"CPU {model}, {threads} thread{'s' if threads != 1 else ''}"


def versions():
    out = {"prcl": prcl.__version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001 (a broken triton must not stop a CPU benchmark)
        out["triton"] = f"unavailable ({type(e).__name__})"
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def flops(B, N, D, mode):
    """The FLOP basis of DESIGN §3: 2·B·N·D forward only, 6·B·N·D forward+backward."""
    return (2 if mode == "fwd" else 6) * B * N * D


# ---------------------------------------------------------------------------------------------------
# Inputs: one case per (B, N, D, dtype, label form)


def default_docs(B, label_form):
    return HARDNEG_FACTOR * B if label_form == "hardneg" else B


@dataclass
class Case:
    B: int
    N: int
    D: int
    dtype: str
    label_form: str
    device: torch.device
    q: torch.Tensor
    d: torch.Tensor
    labels: torch.Tensor | None
    label_index: torch.Tensor | None
    seed: int = 0

    @property
    def id(self):
        return f"B{self.B}-N{self.N}-D{self.D}-{self.dtype}-{self.label_form}"

    def spec(self):
        """What make_case needs to rebuild these inputs elsewhere (the CPU memory worker)."""
        return dict(B=self.B, N=self.N, D=self.D, dtype=self.dtype, label_form=self.label_form,
                    seed=self.seed)

    def input_bytes(self):
        return sum(t.numel() * t.element_size() for t in (self.q, self.d, self.labels, self.label_index)
                   if t is not None)


def make_case(B, N, D, dtype="fp32", device="cpu", label_form="diagonal", seed=0):
    """Unit-norm embeddings (as encoders produce them) and labels in one of the four forms:

    diagonal: labels=None, pair (i, i) positive.      graded: (B,) relevance of pair (i, i) in [0, 1).
    sparse:   (B, K=4) labels with label_index: the diagonal positive plus three graded documents.
    hardneg:  diagonal positives among N = 8·B documents (the in-batch positives plus hard negatives).
    """
    if label_form not in LABEL_FORMS:
        raise ValueError(f"label_form: expected one of {LABEL_FORMS}, got {label_form!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {dtype!r}")
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    q = F.normalize(torch.randn(B, D, device=device, generator=g), dim=1).to(DTYPES[dtype])
    d = F.normalize(torch.randn(N, D, device=device, generator=g), dim=1).to(DTYPES[dtype])
    labels = label_index = None
    if label_form == "graded":
        labels = torch.rand(B, device=device, generator=g)
    elif label_form == "sparse":
        K = min(SPARSE_K, N)
        width = N // K
        # offsets 0 and k·width + [0, width) for k ≥ 1 are distinct mod N: no document twice in a row
        offsets = [torch.zeros(B, dtype=torch.int64, device=device)] + [
            k * width + torch.randint(0, width, (B,), device=device, generator=g) for k in range(1, K)]
        rows = torch.arange(B, device=device)
        label_index = torch.stack([(rows + o) % N for o in offsets], dim=1)
        labels = torch.cat([torch.ones(B, 1, device=device),
                            0.5 * torch.rand(B, K - 1, device=device, generator=g)], dim=1)
    return Case(B, N, D, dtype, label_form, device, q, d, labels, label_index, seed)


# ---------------------------------------------------------------------------------------------------
# Implementations under test. Each `fn(q, d, labels, label_index)` returns the scalar loss; every one
# computes the same number for the cases it supports (scale 10, bias −log(N−1), mean over queries).


class Unsupported(Exception):
    """The implementation cannot run this case (label form, shape, device); the message says why."""


def resolved_backend(device):
    from prcl.functional import _auto_backend

    return _auto_backend(torch.device(device))


def prcl_loss(backend=None):
    def fn(q, d, labels, label_index):
        return prcl.fused_pair_bce(q, d, labels, label_index=label_index, scale=SCALE, backend=backend)

    return fn


def reference_loss(q, d, labels, label_index):
    return reference.pair_bce(q, d, labels, label_index=label_index, scale=SCALE)


def compiled_reference():
    """torch.compile of the eager reference. Compilation happens on the first call (on CPU it needs a
    C++ compiler), so callers treat an exception there as "n/a" with the reason."""
    # Every label form, mode and size is a recompile of the same function: the default limit (8)
    # was hit in one sweep, after which dynamo silently runs the eager code and the numbers lie.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    return torch.compile(reference_loss)


def _diagonal_square(name, q, d, labels):
    if labels is not None or q.shape[0] != d.shape[0]:
        raise Unsupported(f"{name} takes diagonal labels on square batches only")


def _load_open_clip_loss_module():
    try:
        import open_clip.loss as loss_module

        return loss_module
    except ImportError:
        pass
    # open_clip's package __init__ imports its image transforms and so torchvision, which PyPI's build
    # cannot load beside torch's CPU wheel ("operator torchvision::nms does not exist"). loss.py needs
    # torch alone: load that one file, without the package, to compare the loss wherever it installs.
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open-clip-torch is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    loss_spec = importlib.util.spec_from_file_location("_prcl_bench_open_clip_loss", path)
    loss_module = importlib.util.module_from_spec(loss_spec)
    loss_spec.loader.exec_module(loss_module)
    return loss_module


def open_clip_loss():
    """open_clip's SigLipLoss (one process): −Σ logsigmoid(±z)/B with z = t·q·dᵀ + b, diagonal labels."""
    siglip = _load_open_clip_loss_module().SigLipLoss()

    def fn(q, d, labels, label_index):
        _diagonal_square("open_clip SigLipLoss", q, d, labels)
        return siglip(q, d, SCALE, default_bias(d.shape[0]))

    return fn


def siglip_kernel_loss():
    """siglip-kernel's fused_siglip_loss(img, txt, log_temperature, bias) (looked up in its 0.1.2
    source): its router picks chunked cuBLAS + Triton for 16-bit inputs, a fused kernel for fp32."""
    if not torch.cuda.is_available():
        raise ImportError("siglip-kernel runs on CUDA only")
    from siglip_kernel import fused_siglip_loss

    def fn(q, d, labels, label_index):
        _diagonal_square("siglip-kernel", q, d, labels)
        if q.device.type != "cuda":
            raise Unsupported("siglip-kernel runs on CUDA only")
        log_t = torch.tensor(math.log(SCALE), device=q.device)
        bias = torch.tensor(default_bias(d.shape[0]), device=q.device)
        return fused_siglip_loss(q, d, log_t, bias)

    return fn


class _ThreeGemms(torch.autograd.Function):
    """The hardware floor of DESIGN §3: S = q·dᵀ forward, G·d and Gᵀ·q backward (G := S: the values
    do not matter for time). Its forward returns one element of S, so nothing else runs."""

    @staticmethod
    def forward(ctx, q, d):
        S = q @ d.T
        ctx.save_for_backward(q, d, S)
        return S[0, 0].float()

    @staticmethod
    def backward(ctx, grad):
        q, d, S = ctx.saved_tensors
        return S @ d, S.T @ q


def gemm_floor():
    def fn(q, d, labels, label_index):
        return _ThreeGemms.apply(q, d)

    return fn


@dataclass
class Impl:
    name: str            # stable key: table rows, pytest ids, report lines
    factory: object      # () -> fn; raises ImportError/RuntimeError when not usable here
    bytes_per_pair: int  # rough peak per B·N pair, fwd+bwd, for skipping cases that cannot fit
    label: str = ""      # longer name for the CLI table

    def make(self):
        """(fn, None) or (None, reason it is not available)."""
        try:
            return self.factory(), None
        except Exception as e:  # noqa: BLE001 (an optional peer failing to import must not end a run)
            return None, f"{type(e).__name__}: {_first_line(e)}"


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else ""


def implementations(device, compile_reference=True, peers=True, floor=False):
    """[Impl] in table order: prcl on the auto backend (and, on CPU, the bounded-memory torch path
    when auto picked another), the eager reference, torch.compile of it, the optional peers, and the
    three-GEMM floor."""
    device = torch.device(device)
    auto = resolved_backend(device)
    # The eager reference keeps S, z, the dense label matrix, the per-pair loss and its masked copy
    # plus their gradients alive; the compiled one fuses the elementwise chain; open_clip keeps
    # logits, ±1 labels and their product. prcl's panels are a constant workspace.
    impls = [Impl("prcl", lambda: prcl_loss(None), 0, f"prcl ({auto})")]
    if device.type == "cpu" and auto != "torch":
        impls.append(Impl("prcl-torch", lambda: prcl_loss("torch"), 0, "prcl (torch)"))
    impls.append(Impl("eager", lambda: reference_loss, 24, "eager reference"))
    if compile_reference:
        impls.append(Impl("compiled", compiled_reference, 12, "torch.compile(reference)"))
    if peers:
        impls.append(Impl("open_clip", open_clip_loss, 20, "open_clip SigLipLoss"))
        impls.append(Impl("siglip-kernel", siglip_kernel_loss, 2, "siglip-kernel"))
    if floor:
        impls.append(Impl("gemm-floor", gemm_floor, 4, "3 GEMMs (floor)"))
    return impls


def implementation(name, device, **kw):
    kw = {"compile_reference": True, "peers": True, "floor": True, **kw}
    for impl in implementations(device, **kw):
        if impl.name == name:
            return impl
    raise ValueError(f"no implementation {name!r} on {device}")


def free_bytes(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        return 1 << 62


GOLD_BYTES_PER_PAIR = 48  # the float64 reference, fwd+bwd


def fit_problem(what, bytes_per_pair, B, N, device, margin=0.8):
    """None when B×N pairs at bytes_per_pair should fit in free memory, else the reason they won't."""
    need = bytes_per_pair * B * N
    free = free_bytes(device)
    if need > margin * free:
        return (f"{what} needs ~{need / 2**30:.1f} GiB for {B}x{N} pairs ({bytes_per_pair} B/pair), "
                f"{free / 2**30:.1f} GiB free")
    return None


# ---------------------------------------------------------------------------------------------------
# One measured step, timing, peak memory


class Step:
    """One forward (no grad) or forward+backward of fn on the case's inputs, as a zero-arg callable.

    fwd+bwd runs on leaf views of the same storage, so the inputs are never copied; `clear()` drops
    the gradients so that a memory measurement starts from the inputs alone."""

    def __init__(self, fn, case, mode):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.fn, self.case, self.mode = fn, case, mode
        self.q = case.q.detach().requires_grad_(mode == "fwd+bwd")
        self.d = case.d.detach().requires_grad_(mode == "fwd+bwd")

    def clear(self):
        self.q.grad = self.d.grad = None

    def __call__(self):
        c = self.case
        if self.mode == "fwd":
            with torch.no_grad():
                return self.fn(self.q, self.d, c.labels, c.label_index)
        self.clear()
        loss = self.fn(self.q, self.d, c.labels, c.label_index)
        loss.backward()
        return loss


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step, device, repeats, warmup=1):
    """Wall-clock seconds of `repeats` calls after `warmup` untimed ones (compilation, caches)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def rounds_for(seconds_per_call, budget_s, lo=3, hi=50):
    """How many timed rounds fit a time budget, given one call's time."""
    return max(lo, min(hi, int(budget_s / max(seconds_per_call, 1e-9))))


def summarize(times):
    """Median and interquartile range of a list of seconds."""
    if len(times) == 1:
        return times[0], 0.0
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return statistics.median(times), q3 - q1


def profiled_peak_bytes(fn):
    """Peak bytes torch's CPU allocator held during fn() above its level before, read from the
    profiler's allocation events (frees are allocations of negative size). A private profiler API:
    None if it moved."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    level = peak = 0
    for _, size in sorted(events):
        level += size
        peak = max(peak, level)
    return peak


def _proc_status(key):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def cpu_memory_problem():
    """None when the CPU peak-memory meter works here, else why it does not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status("VmHWM")
    except (OSError, AttributeError) as e:
        return f"the CPU memory meter needs Linux's /proc/self/clear_refs and VmHWM ({type(e).__name__})"
    return None


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(step, device):
    """Bytes allocated beyond what is live before one call of step (the inputs), at the call's peak.
    Gradients the step leaves behind count: the step allocates them.

    CUDA: max_memory_allocated during the call minus memory_allocated before it.
    CPU: resident-set growth: VmHWM after the call minus VmRSS before it, with VmHWM reset by writing 5
    to /proc/self/clear_refs (tracemalloc does not see ATen's allocations). Trustworthy only in a
    process whose glibc maps every large block with mmap (MALLOC_MMAP_THRESHOLD_ fixed, as
    CpuMemoryProbe sets): with the default dynamic threshold, freed blocks stay in the heap and the
    same call read 80 to 130 MiB depending on what ran before it. Use `measure_peak_memory`.
    """
    device = torch.device(device)
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
    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _proc_status("VmRSS")
    step()
    return max(0, _proc_status("VmHWM") - base)


# glibc maps blocks above this with mmap and unmaps them on free, so RSS follows live tensors; the
# env var also switches off the dynamic threshold that otherwise rises to the largest freed block.
_MMAP_THRESHOLD = 1 << 17


def _memory_worker(conn):
    """Serves CpuMemoryProbe: (impl name, case spec, mode) -> bytes, or an error string."""
    cases, fns = {}, {}
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        name, spec, mode, threads = request
        try:
            torch.set_num_threads(threads)
            key = tuple(sorted(spec.items()))
            if key not in cases:
                cases.clear()
                gc.collect()
                cases[key] = make_case(device="cpu", **spec)
            if name not in fns:
                fn, reason = implementation(name, "cpu").make()
                if fn is None:
                    raise Unsupported(reason)
                fns[name] = fn
            step = Step(fns[name], cases[key], mode)
            step()  # warm-up: compilation, thread pools and lazy initialisation are not the step's
            conn.send(("ok", peak_memory(step, "cpu")))
            step.clear()
        except Exception as e:  # noqa: BLE001 (report, keep serving)
            conn.send(("error", f"{type(e).__name__}: {_first_line(e)}"))


class CpuMemoryProbe:
    """Peak CPU memory of a step, measured in a separate, long-lived process.

    Separate, so that the glibc setting that makes RSS honest (every large block mmap'd, see
    _MMAP_THRESHOLD) does not slow the timed process: there, freed blocks are reused from the heap
    as in any training loop. Long-lived, so a sweep pays for starting torch once, not per case."""

    def __init__(self):
        self._proc = self._conn = None

    def _start(self):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(_MMAP_THRESHOLD)  # read by the child's glibc at start
        try:
            self._proc = ctx.Process(target=_memory_worker, args=(child,), daemon=True)
            self._proc.start()
        finally:
            if saved is None:
                del os.environ["MALLOC_MMAP_THRESHOLD_"]
            else:
                os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
        child.close()

    def measure(self, name, case, mode, timeout_s=600):
        """(bytes, None) or (None, reason)."""
        problem = cpu_memory_problem()
        if problem:
            return None, problem
        if self._proc is None or not self._proc.is_alive():
            self._start()
        try:
            self._conn.send((name, case.spec(), mode, torch.get_num_threads()))
            if not self._conn.poll(timeout_s):
                raise TimeoutError(f"no answer in {timeout_s} s")
            status, value = self._conn.recv()
        except (EOFError, OSError, TimeoutError) as e:
            self.close()
            return None, f"memory worker died ({type(e).__name__}: {_first_line(e)}; out of memory?)"
        return (value, None) if status == "ok" else (None, value)

    def close(self):
        if self._proc is not None:
            try:
                self._conn.send(None)
            except (OSError, BrokenPipeError):
                pass
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
            self._proc = None


_probe = None


def measure_peak_memory(name, step, case):
    """Peak memory beyond the inputs of one warm call of implementation `name` on `case`:
    (bytes, None) or (None, reason). CUDA measures `step` in place; CPU asks the memory worker."""
    global _probe
    if case.device.type == "cuda":
        return peak_memory(step, case.device), None
    if _probe is None:
        import atexit

        _probe = CpuMemoryProbe()
        atexit.register(_probe.close)
    return _probe.measure(name, case, step.mode)


def errors_vs_float64(fn, case):
    """(relative error of the loss, max over dq, dd of max|g − g64| / max|g64|) against the float64
    reference on the same inputs."""

    def run(f, q, d):
        q, d = q.detach().requires_grad_(), d.detach().requires_grad_()
        loss = f(q, d, case.labels, case.label_index)
        loss.backward()
        return loss.detach().double(), q.grad.double(), d.grad.double()

    gold = run(reference_loss, case.q.double(), case.d.double())
    got = run(fn, case.q, case.d)
    loss_err = (abs(got[0] - gold[0]) / abs(gold[0]).clamp(min=1e-300)).item()
    grad_err = max(((g - g64).abs().max() / g64.abs().max().clamp(min=1e-300)).item()
                   for g, g64 in zip(got[1:], gold[1:]))
    return loss_err, grad_err


# ---------------------------------------------------------------------------------------------------
# The CLI


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m prcl bench",
        description="prcl.fused_pair_bce vs the eager reference (and torch.compile of it, and open_clip / "
                    "siglip-kernel when installed): forward and forward+backward median time, TFLOP/s, "
                    "peak memory, error vs float64.")
    p.add_argument("-B", "--batch", type=int, default=2048, help="queries B (default 2048)")
    p.add_argument("-N", "--docs", type=int, default=None,
                   help="documents N (default B; 8·B for --label-form hardneg)")
    p.add_argument("-D", "--dim", type=int, default=256, help="embedding dim D (default 256)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (default 10)")
    p.add_argument("--label-form", choices=LABEL_FORMS, default="diagonal")
    p.add_argument("--no-compile", action="store_true", help="leave out torch.compile of the reference")
    p.add_argument("--no-peers", action="store_true", help="leave out open_clip and siglip-kernel")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads); default: torch's choice")
    p.add_argument("--seed", type=int, default=0)
    return p


def _ms(times):
    med, iqr = summarize(times)
    return f"{med * 1e3:.3g} ±{iqr * 1e3 / 2:.2g}"


def _mib(n):
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def measure(impl, case, repeats):
    """One table row: {'fwd': times, 'fwd+bwd': times, 'mem': {mode: bytes}, 'err': (loss, grad)},
    or {'problem': reason} when the implementation does not run here."""
    row = {"name": impl.label or impl.name, "mem": {}, "notes": []}
    problem = fit_problem(impl.name, impl.bytes_per_pair, case.B, case.N, case.device)
    fn, reason = (None, problem) if problem else impl.make()
    if fn is None:
        return {**row, "problem": reason}
    try:
        for mode in MODES:
            step = Step(fn, case, mode)
            row[mode] = time_step(step, case.device, repeats)
            step.clear()
    except Exception as e:  # noqa: BLE001 (a peer or the compiler failing must not end the table)
        return {**row, "problem": f"{type(e).__name__}: {_first_line(e)}"}
    for mode in MODES:
        row["mem"][mode], why = measure_peak_memory(impl.name, Step(fn, case, mode), case)
        if why:
            row["notes"].append(f"peak memory {mode}: n/a: {why}")
    if fit_problem("float64 gold", GOLD_BYTES_PER_PAIR, case.B, case.N, case.device):
        row["err"] = None
        row["notes"].append("errors: n/a: the float64 reference does not fit")
    else:
        row["err"] = errors_vs_float64(fn, case)
    return row


def render(rows, case, repeats):
    B, N, D = case.B, case.N, case.D
    head = ["implementation", "fwd ms", "TFLOP/s", "fwd+bwd ms", "TFLOP/s", "x eager",
            "peak MiB fwd", "peak MiB f+b", "loss err", "grad err"]
    eager = next((r for r in rows if r["name"] == "eager reference" and "problem" not in r), None)
    body, notes = [], []
    for r in rows:
        notes += [f"{r['name']}: {n}" for n in r["notes"]]
        if "problem" in r:
            body.append([r["name"], "n/a"] + [""] * (len(head) - 2))
            notes.append(f"{r['name']}: n/a: {r['problem']}")
            continue
        fwd_s, fb_s = summarize(r["fwd"])[0], summarize(r["fwd+bwd"])[0]
        speedup = f"{summarize(eager['fwd+bwd'])[0] / fb_s:.2f}" if eager else ""
        err = r["err"]
        body.append([r["name"], _ms(r["fwd"]), f"{flops(B, N, D, 'fwd') / fwd_s / 1e12:.3g}",
                     _ms(r["fwd+bwd"]), f"{flops(B, N, D, 'fwd+bwd') / fb_s / 1e12:.3g}", speedup,
                     _mib(r["mem"]["fwd"]), _mib(r["mem"]["fwd+bwd"]),
                     f"{err[0]:.1e}" if err else "n/a", f"{err[1]:.1e}" if err else "n/a"])
    widths = [max(len(str(x[i])) for x in [head] + body) for i in range(len(head))]

    def fmt(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    v = versions()
    meter = ("max_memory_allocated delta" if case.device.type == "cuda"
             else "resident-set growth (VmHWM) in a worker process")
    lines = [
        f"prcl {v['prcl']} · torch {v['torch']} · triton {v['triton']} · device: {device_name(case.device)}",
        f"case: B={B} N={N} D={D} {case.dtype}, labels={case.label_form}, scale={SCALE:g}, "
        f"bias=-log(N-1); inputs {case.input_bytes() / 2**20:.1f} MiB",
        f"time: median ± half the interquartile range of {repeats} calls after one warm-up; "
        "TFLOP/s on 2·B·N·D (fwd) and 6·B·N·D (fwd+bwd); x eager: fwd+bwd speed-up",
        f"peak: memory beyond the inputs during one call ({meter}; fwd+bwd includes the gradients)",
        "err: vs prcl.reference in float64: |loss - loss64| / |loss64|, max|g - g64| / max|g64| over dq, dd",
        "",
        fmt(head),
        fmt(["-" * w for w in widths]),
        *map(fmt, body),
    ]
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv=None):
    args = _parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("prcl bench: --device cuda, but torch sees no CUDA device")
        return 2
    N = args.docs or default_docs(args.batch, args.label_form)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if min(args.batch, N, args.dim, args.repeats) < 1:
            raise ValueError(f"-B, -N, -D and --repeats must be >= 1, got B={args.batch} N={N} "
                             f"D={args.dim} repeats={args.repeats}")
        case = make_case(args.batch, N, args.dim, args.dtype, device, args.label_form, args.seed)
        check_inputs(case.q, case.d, case.labels, case.label_index, SCALE, None, "mean", None)
    except ValueError as e:
        print(f"prcl bench: {e}")
        return 2
    impls = implementations(device, compile_reference=not args.no_compile, peers=not args.no_peers)
    rows = []
    for impl in impls:
        row = measure(impl, case, args.repeats)
        # a peer that is simply not installed, or cannot take this case, is left out of the table
        if impl.name in ("open_clip", "siglip-kernel") and "problem" in row:
            continue
        rows.append(row)
        gc.collect()
    print(render(rows, case, args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
