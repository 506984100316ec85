"""Table (mean ± std over seeds) and plot of run_minilm.py's results.

    python benchmarks/quality/report.py      # results/minilm.jsonl -> results/minilm.md, results/minilm.png
"""
import argparse
import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
METRICS = ("ndcg@10", "recall@1", "recall@10", "recall@100", "mrr@10", "map@100")
ORDER = ("zero-shot", "infonce", "prcl-binary", "prcl-graded", "prcl-all")


def groups(records):
    out = {}
    for r in records:
        key = (r["loss"], r["split"], r.get("steps"), r.get("batch_size"), r.get("lr"), r["max_seq_length"])
        out.setdefault(key, []).append(r)
    for rs in out.values():
        rs.sort(key=lambda r: r["seed"])
    return dict(sorted(out.items(), key=lambda kv: (ORDER.index(kv[0][0]), str(kv[0][1:]))))


def fmt(values):
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", default=str(HERE / "results" / "minilm.jsonl"))
    args = ap.parse_args()
    path = Path(args.results)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = groups(records)
    lines = ["| loss | split | steps × batch | lr | seeds | " + " | ".join(METRICS) + " | CPU-s per run (mean) |",
             "|---" * (6 + len(METRICS)) + "|"]
    for (loss, split, steps, batch, lr, _), rs in rows.items():
        train = [r["cpu_s"] for r in rs]
        lines.append(f"| {loss} | {split} | {f'{steps} × {batch}' if steps else '—'} | {lr or '—'} | "
                     f"{','.join(str(r['seed']) for r in rs)} | "
                     + " | ".join(fmt([r[m] for r in rs]) for m in METRICS)
                     + f" | {statistics.mean(train):.0f} |")
    lines += ["", "Commands, one per run (in benchmarks/quality/, under OMP_NUM_THREADS=1 nice -n 10):", ""] + [f"    {r['command']}" for rs in rows.values() for r in rs]
    first = records[0]
    lines += ["", f"CPU: {first['cpu']}, {first['threads']} thread(s), torch {first['torch']}, "
              f"max_seq_length {first['max_seq_length']}."]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for n, ((loss, split, *_), rs) in enumerate(rows.items()):
        ys = [r["ndcg@10"] for r in rs]
        ax.scatter([n] * len(ys), ys, color="C0", alpha=0.6)
        ax.errorbar(n + 0.15, statistics.mean(ys), yerr=statistics.stdev(ys) if len(ys) > 1 else 0,
                    fmt="s", color="C3", capsize=4)
    ax.set_xticks(range(len(rows)), [k[0] for k in rows])
    ax.set_ylabel(f"nDCG@10 ({next(iter(rows))[1]} split)")
    ax.set_title("all-MiniLM-L6-v2 on man pages 2/3: dots = seeds, square = mean ± std", fontsize=9)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
