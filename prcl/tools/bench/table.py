"""One row per implementation (time, peak memory, error vs float64), a progress line per row, and
the rendered table; then the small batches, where the host's per-call work shows."""
from collections.abc import Sequence
from typing import Any

import torch

from prcl.tools.bench import MODES, first_line
from prcl.tools.bench.cases import GOLD_BYTES_PER_PAIR, Case, device_name, fit_problem, flops, make_case, versions
from prcl.tools.bench.memory import measure_peak_memory
from prcl.tools.bench.peers import SCALE, Impl, prcl_loss, reference_loss, resolved_backend
from prcl.tools.bench.timing import SPREAD_WARNING, LossFn, Step, rounds_for, spread, summarize, time_step

# (B = N, D) where the host's per-call work (checks, label layout, dispatch, autograd) is much of a call:
# gradient-cache chunks and per-rank shards live there
SMALL_BATCHES = ((32, 64), (128, 256))
SMALL_BUDGET_S = 0.3  # timed seconds per implementation and size, at least 15 calls

Load = tuple[float, int | None] | None  # timing.load_average()


def errors_vs_float64(fn: LossFn, case: Case) -> tuple[float, float]:
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


def measure(impl: Impl, case: Case, repeats: int) -> dict[str, Any]:
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
        return {**row, "problem": f"{type(e).__name__}: {first_line(e)}"}
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


def _ms(times):
    med, iqr = summarize(times)
    return f"{med * 1e3:.3g} ±{iqr * 1e3 / 2:.2g}"


def _mib(n):
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def _spread(row):
    return max(spread(row[mode]) for mode in MODES)


def progress_line(row: dict[str, Any], seconds: float) -> str:
    """The line printed as soon as a row is measured."""
    if "problem" in row:
        return f"  {row['name']}: n/a: {row['problem']}"
    fwd, fb = (summarize(row[mode])[0] * 1e3 for mode in MODES)
    mem = row["mem"]
    return (f"  {row['name']}: fwd {fwd:.3g} ms, fwd+bwd {fb:.3g} ms (spread {_spread(row):.0%}), "
            f"peak {_mib(mem['fwd'])} / {_mib(mem['fwd+bwd'])} MiB  [{seconds:.0f} s]")


def load_text(load: Load) -> str:
    return "load average: not available here" if load is None else \
        f"load average {load[0]:.2f} on {load[1]} CPU{'s' if load[1] != 1 else ''}"


def warnings(rows: list[dict[str, Any]], loads: Sequence[Load]) -> list[str]:
    """Lines that say when the timings cannot be trusted: a large spread, a busy machine."""
    out = []
    worst = max((_spread(r) for r in rows if "problem" not in r), default=0.0)
    if worst > SPREAD_WARNING:
        out.append(f"warning: the timings spread by up to {worst:.0%} (interquartile range / median, above "
                   f"{SPREAD_WARNING:.0%}): the medians, and the x eager column, are not stable; re-run on a "
                   "quiet machine, with more --repeats, or with --threads 1 on a shared one")
    busy = [load for load in loads if load is not None and load[0] >= load[1]]
    if busy:
        out.append(f"warning: the machine was busy ({load_text(busy[0])}): other processes share these "
                   "CPUs, so the times are higher and noisier than on a quiet machine")
    return out


def render(rows: list[dict[str, Any]], case: Case, repeats: int, loads: Sequence[Load] = ()) -> str:
    B, N, D = case.B, case.N, case.D
    head = ["implementation", "fwd ms", "TFLOP/s", "fwd+bwd ms", "TFLOP/s", "spread", "x eager",
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
                     _ms(r["fwd+bwd"]), f"{flops(B, N, D, 'fwd+bwd') / fb_s / 1e12:.3g}",
                     f"{_spread(r):.0%}", speedup, _mib(r["mem"]["fwd"]), _mib(r["mem"]["fwd+bwd"]),
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
        f"time: median ± half the interquartile range of {repeats} calls after one warm-up; spread: "
        "interquartile range / median (worse mode); TFLOP/s on 2·B·N·D (fwd) and 6·B·N·D (fwd+bwd); "
        "x eager: fwd+bwd speed-up",
        f"peak: memory beyond the inputs during one call ({meter}; fwd+bwd includes the gradients)",
        "err: vs prcl.backends.reference in float64: |loss - loss64| / |loss64|, max|g - g64| / max|g64| over dq, dd",
        "machine: " + " -> ".join(load_text(load) for load in loads) if loads else "machine: load not read",
        "",
        fmt(head),
        fmt(["-" * w for w in widths]),
        *map(fmt, body),
    ]
    tail = notes + warnings(rows, loads)
    return "\n".join(lines + ([""] + tail if tail else []))


def measure_small_batches(device: str | torch.device, seed: int = 0) -> list[tuple[Case, dict[str, list[float]]]]:
    """[(case, {"prcl": seconds, "eager": seconds})]: fwd+bwd of each call at SMALL_BATCHES, fp32, diagonal
    labels, on one CPU thread (the host's work is what these sizes show)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = []
        for B, D in SMALL_BATCHES:
            case = make_case(B, B, D, "fp32", device, "diagonal", seed)
            times = {}
            for name, fn in (("prcl", prcl_loss()), ("eager", reference_loss)):
                step = Step(fn, case, "fwd+bwd")
                first = time_step(step, device, 1)[0]
                times[name] = time_step(step, device, rounds_for(first, SMALL_BUDGET_S, lo=15, hi=2000), warmup=0)
            out.append((case, times))
        return out
    finally:
        torch.set_num_threads(threads)


def render_small_batches(measured: list[tuple[Case, dict[str, list[float]]]], device: str | torch.device) -> str:
    calls = min(len(t) for _, times in measured for t in times.values())
    lines = [f"small batches: fwd+bwd, fp32, labels=diagonal, 1 CPU thread, prcl ({resolved_backend(device)}) vs "
             f"eager; median ± half the interquartile range of at least {calls} calls; x eager: speed-up"]
    for case, times in measured:
        speedup = summarize(times["eager"])[0] / summarize(times["prcl"])[0]
        lines.append(f"  B=N={case.B} D={case.D}: prcl {_ms(times['prcl'])} ms, eager {_ms(times['eager'])} ms, "
                     f"x eager {speedup:.2f}")
    return "\n".join(lines)
