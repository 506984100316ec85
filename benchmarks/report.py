"""Turn pytest-benchmark JSON from bench_loss.py into a markdown table, a PNG plot and a README.

    python benchmarks/report.py RESULTS.json [MORE.json ...] --out benchmarks/results/<date>-<device>/ \
        --command "the exact pytest command"

Writes table.md (one row per case and mode, one column per implementation: median ms and peak MiB),
plot.png (time and peak memory vs batch size, one line per implementation, log axes) and README.md
(device, date, versions, command, the table, the plot). Several JSON files (a sweep run in slices)
merge into one report. Only numbers in the JSON appear: nothing is estimated or carried over.
"""
import argparse
import json
import shutil
import statistics
from collections import defaultdict
from pathlib import Path

IMPL_ORDER = ["prcl", "prcl-torch", "eager", "compiled", "open_clip", "siglip-kernel", "gemm-floor"]
LABEL_ORDER = ["diagonal", "graded", "sparse", "hardneg"]
MODE_ORDER = ["fwd", "fwd+bwd"]
STYLE = {"prcl": ("tab:red", "o"), "prcl-torch": ("tab:orange", "s"), "eager": ("tab:blue", "^"),
         "compiled": ("tab:green", "v"), "open_clip": ("tab:purple", "D"),
         "siglip-kernel": ("tab:brown", "P"), "gemm-floor": ("tab:gray", "x")}


def load(paths):
    """[(entry, run)] over every benchmark of every file; run is the file's top-level JSON."""
    out = []
    for path in paths:
        run = json.loads(Path(path).read_text())
        for bench in run["benchmarks"]:
            if "impl" in bench.get("extra_info", {}):
                out.append((bench, run))
    if not out:
        raise SystemExit(f"no bench_loss entries in {', '.join(map(str, paths))}")
    return out


def _order(seq, value):
    return seq.index(value) if value in seq else len(seq)


def _case_key(x):
    return (x["dtype"], x["D"], _order(LABEL_ORDER, x["label_form"]), _order(MODE_ORDER, x["mode"]),
            x["B"], x["N"])


def rows(entries):
    """{case key: {impl: (median s, iqr s, tflops, peak bytes)}}, the case keys in reading order."""
    table = defaultdict(dict)
    for bench, _ in entries:
        x, s = bench["extra_info"], bench["stats"]
        table[_case_key(x)][x["impl"]] = (s["median"], s["iqr"], x["tflops"], x.get("peak_bytes"))
    return dict(sorted(table.items()))


def _cell(v):
    if v is None:
        return "—"
    med, iqr, tflops, peak = v
    mem = "n/a" if peak is None else f"{peak / 2**20:.1f} MiB"
    return f"{med * 1e3:.3g} ±{iqr * 1e3 / 2:.2g} ms · {mem}"


def markdown_table(entries):
    table = rows(entries)
    impls = sorted({i for v in table.values() for i in v}, key=lambda i: _order(IMPL_ORDER, i))
    head = ["dtype", "D", "labels", "mode", "B", "N"] + impls + ["prcl vs eager (time)", "prcl TFLOP/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (dtype, D, label, mode, B, N), v in table.items():
        speed = (f"{v['eager'][0] / v['prcl'][0]:.2f}x" if "prcl" in v and "eager" in v else "—")
        tflops = f"{v['prcl'][2]:.3g}" if "prcl" in v else "—"
        cells = [dtype, str(D), LABEL_ORDER[label] if label < len(LABEL_ORDER) else "?",
                 MODE_ORDER[mode] if mode < len(MODE_ORDER) else "?", str(B), str(N)]
        lines.append("| " + " | ".join(cells + [_cell(v.get(i)) for i in impls] + [speed, tflops]) + " |")
    return "\n".join(lines) + "\n"


def plot(entries, path, where=()):
    """One row of panels per (dtype, D, labels); columns: fwd time, fwd+bwd time, fwd+bwd peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(list)  # (dtype, D, label, mode, impl) -> [(B, median, peak)]
    for bench, _ in entries:
        x = bench["extra_info"]
        if any(str(x.get(k)) != v for k, v in where):
            continue
        series[(x["dtype"], x["D"], x["label_form"], x["mode"], x["impl"])].append(
            (x["B"], bench["stats"]["median"], x.get("peak_bytes")))
    facets = sorted({k[:3] for k in series}, key=lambda f: (f[0], f[1], _order(LABEL_ORDER, f[2])))
    if not facets:
        raise SystemExit("nothing to plot after the --where filters")
    columns = [("fwd", "time"), ("fwd+bwd", "time"), ("fwd+bwd", "memory")]
    fig, axes = plt.subplots(len(facets), len(columns), figsize=(4.2 * len(columns), 3.0 * len(facets)),
                             squeeze=False)
    for r, facet in enumerate(facets):
        for c, (mode, what) in enumerate(columns):
            ax = axes[r][c]
            for impl in IMPL_ORDER + sorted({k[4] for k in series} - set(IMPL_ORDER)):
                pts = sorted(series.get((*facet, mode, impl), []))
                if what == "memory":
                    pts = [p for p in pts if p[2] is not None]
                if not pts or (what == "memory" and impl == "gemm-floor"):
                    continue
                ys = [p[1] * 1e3 for p in pts] if what == "time" else [max(p[2], 1) / 2**20 for p in pts]
                color, marker = STYLE.get(impl, (None, "."))
                ax.plot([p[0] for p in pts], ys, marker=marker, color=color, label=impl)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size B")
            ax.set_ylabel("median ms" if what == "time" else "peak MiB beyond inputs")
            ax.set_title(f"{facet[0]} D={facet[1]} {facet[2]}: {mode} {what}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _default_where(entries):
    labels = {b["extra_info"]["label_form"] for b, _ in entries}
    facets = {(b["extra_info"]["dtype"], b["extra_info"]["D"], b["extra_info"]["label_form"]) for b, _ in entries}
    # a CUDA sweep has 40 (dtype, D, labels) facets: plot the diagonal ones unless asked otherwise
    return [("label_form", "diagonal")] if len(facets) > 8 and "diagonal" in labels else []


def meta(entries, paths, command):
    infos = [b["extra_info"] for b, _ in entries]
    runs = {id(run): run for _, run in entries}.values()
    first = next(iter(runs))
    loads = [x["load_avg_1m"] for x in infos if x.get("load_avg_1m") is not None]
    rounds = [b["stats"]["rounds"] for b, _ in entries]
    versions = sorted({f"prcl {x['prcl_version']} · torch {x['torch_version']} · triton {x['triton_version']}"
                       for x in infos})
    lines = [
        f"- device: {', '.join(sorted({x['device_name'] for x in infos}))}",
        f"- date: {', '.join(sorted({run['datetime'] for run in runs}))}",
        f"- versions: {'; '.join(versions)}; python {first['machine_info'].get('python_version')}; "
        f"pytest-benchmark {first.get('version')}",
        f"- commit: {first.get('commit_info', {}).get('id', 'unknown')}"
        + (" (working tree had uncommitted changes)" if first.get("commit_info", {}).get("dirty") else ""),
        f"- threads: {', '.join(sorted({str(x.get('threads')) for x in infos}))}; "
        f"entries: {len(entries)}; timed rounds per entry: {min(rounds)}–{max(rounds)}",
    ]
    if loads:
        lines.append(f"- 1-minute load average while measuring: {min(loads):.1f}–{max(loads):.1f} "
                     f"(median {statistics.median(loads):.1f}); the machine is shared, so CPU times carry "
                     "that contention")
    lines.append(f"- raw results: {', '.join(Path(p).name for p in paths)}")
    if command:
        lines.append(f"- command: `{command}`")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="pytest-benchmark JSON files (--benchmark-json=...)")
    p.add_argument("--out", required=True, help="folder for table.md, plot.png, README.md (and the JSON)")
    p.add_argument("--command", default="", help="the exact command that produced the JSON")
    p.add_argument("--where", action="append", default=None, metavar="KEY=VALUE",
                   help="plot only entries whose extra_info KEY equals VALUE (repeatable)")
    args = p.parse_args(argv)
    entries = load(args.json)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in map(Path, args.json):
        if path.resolve().parent != out.resolve():
            shutil.copy(path, out / path.name)
        copied.append(out / path.name)
    where = [tuple(w.split("=", 1)) for w in args.where] if args.where is not None else _default_where(entries)
    table = markdown_table(entries)
    (out / "table.md").write_text(table)
    plot(entries, out / "plot.png", where)
    filt = " (" + ", ".join(f"{k}={v}" for k, v in where) + ")" if where else ""
    (out / "README.md").write_text(
        f"# prcl benchmark: {out.name}\n\n{meta(entries, copied, args.command)}\n"
        "Each cell: median ± half the interquartile range of the timed calls, and the peak memory "
        "beyond the inputs during one call (fwd+bwd includes the gradients; CPU: resident-set growth "
        "in a worker process, CUDA: max_memory_allocated delta). — : not run (skipped: see the run's "
        "log, or not applicable: the peers take diagonal labels on square batches only).\n\n"
        f"{table}\n![time and peak memory vs batch size{filt}](plot.png)\n")
    print(f"wrote {out / 'table.md'}, {out / 'plot.png'}, {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
