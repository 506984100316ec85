"""Table (mean ± std over seeds) and plot of run_minilm.py's results, one row per setting; with
run_smollm2.py --eval-every results, also NAME-curves.png (nDCG@10 against training steps).

    python benchmarks/quality/report.py [--results results/minilm.jsonl]   # -> the same name .md and .png
"""
import argparse
import json
import re
import shlex
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
METRICS = ("ndcg@10", "recall@1", "recall@10", "recall@100", "mrr@10", "map@100")
# flags that do not change what is trained or measured
NOT_SETTINGS = {"--seed", "--results", "--split", "--splits", "--threads", "--train-dir", "--eval-every"}


def settings(command):
    """The run's flags but the seed and where results go, as written: the row's key. A flag takes the
    words up to the next flag (--splits dev test; an instruction written unquoted)."""
    flags = []
    for word in shlex.split(command)[2:]:
        if word.startswith("--"):
            flags.append((word, []))
        else:
            flags[-1][1].append(word)
    # one table row; a file of an installed package (a teacher) is named from site-packages on, so the same
    # package in another venv is the same setting, and flags in any order are the same setting
    pairs = sorted((a, re.sub(r"\S*/site-packages/", "", " ".join(b)).replace("\n", "\\n"))
                   for a, b in flags if a not in NOT_SETTINGS)
    loss = dict(pairs).get("--loss")
    return loss, " ".join(f"{a} {b}" for a, b in pairs if a != "--loss")


def groups(records):
    out = {}
    for r in records:
        out.setdefault(settings(r["command"]) + (r["split"],), []).append(r)
    for rs in out.values():
        rs.sort(key=lambda r: r["seed"])
    return out


def fmt(values):
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(HERE / "results" / "minilm.jsonl"))
    ap.add_argument("--title", default="all-MiniLM-L6-v2 on man pages 2/3")
    args = ap.parse_args()
    path = Path(args.results)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = groups(records)
    lines = ["| loss | settings | split | seeds | " + " | ".join(METRICS) + " | CPU-s per run (mean) |",
             "|---" * (5 + len(METRICS)) + "|"]
    for (loss, flags, split), rs in rows.items():
        lines.append(f"| {loss} | {flags or '—'} | {split} | {','.join(str(r['seed']) for r in rs)} | "
                     + " | ".join(fmt([r[m] for r in rs]) for m in METRICS)
                     + f" | {statistics.mean(r['cpu_s'] for r in rs):.0f} |")
    cpus = sorted({f"{r['cpu']}, {r['threads']} thread(s), torch {r['torch']}" for r in records})
    lines += ["", "Commands, one per run (in benchmarks/quality/, under OMP_NUM_THREADS=1 nice -n 10):", ""]
    lines += [f"    {r['command']}".replace("\n", "\\n") for rs in rows.values() for r in rs]  # \n: a newline
    lines += ["", "CPU: " + "; ".join(cpus) + f"; max_seq_length {records[0]['max_seq_length']}."]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.32 * len(rows)))
    for n, rs in enumerate(rows.values()):
        ys = [r["ndcg@10"] for r in rs]
        ax.scatter(ys, [n] * len(ys), color="C0", alpha=0.6, s=14)
        ax.errorbar(statistics.mean(ys), n + 0.2, xerr=statistics.stdev(ys) if len(ys) > 1 else 0,
                    fmt="s", color="C3", capsize=3, markersize=4)
    ax.set_yticks(range(len(rows)), [f"{loss} {flags}".strip() for loss, flags, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("nDCG@10 (" + "/".join(sorted({split for *_, split in rows})) + " split)")
    ax.set_title(f"{args.title}: dots = seeds, square = mean ± std", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    curves = [r for r in records if "curve" in r]
    if curves:
        plot_curves(curves, path.with_name(path.stem + "-curves.png"), args.title)


def curve_label(r):
    """loss, seed and what tells runs of one plot apart: LoRA layers, lr, a teacher, extra data."""
    label = f"{r['loss']} seed {r['seed']}"
    if "lora_layers" in r:
        layers = "all layers" if r["lora_layers"] == 0 else f"last {r['lora_layers']}"
        label += f", LoRA {layers}, lr {r['lr']:g}"
    if r.get("teacher"):
        label += ", teacher " + Path(r["teacher"]).parent.name
    if r.get("extra_train"):
        label += ", + " + Path(r["extra_train"]).parent.name
    return label


def plot_curves(records, out, title):
    """nDCG@10 against training steps, one line per run (the "curve" of run_smollm2.py --eval-every),
    one panel per split."""
    import matplotlib.pyplot as plt

    splits = sorted({r["split"] for r in records})
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 3.6), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for r in (r for r in records if r["split"] == split):
            steps, ys = zip(*r["curve"])
            ax.plot(steps, ys, marker="o", label=curve_label(r))
        ax.set_xlabel("training step")
        ax.set_ylabel(f"nDCG@10 ({split} split)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
