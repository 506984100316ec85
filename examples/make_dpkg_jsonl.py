"""Build an offline retrieval set from this machine's Debian package descriptions.

query = a package's one-line summary, positive = its long description; hard negatives are the
descriptions of other packages in the same Debian section; a package built from the same source
with a different description is a graded document (relevance 0.5). Output is prcl's training JSONL:

    python examples/make_dpkg_jsonl.py --out examples/data       # -> dpkg_train.jsonl, dpkg_eval.jsonl
"""
import argparse
import hashlib
import json
import random
from collections import defaultdict
from pathlib import Path


def read_status(path="/var/lib/dpkg/status"):
    """Yields {field: value} per package stanza; continuation lines join the previous field."""
    stanza, field = {}, None
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines() + [""]:
        if not line.strip():
            if stanza:
                yield stanza
            stanza, field = {}, None
        elif line[0] in " \t" and field:
            stanza[field] += "\n" + line[1:]
        elif ":" in line:
            field, value = line.split(":", 1)
            stanza[field] = value.strip()


def packages(path):
    seen = set()
    for p in read_status(path):
        summary, _, body = p.get("Description", "").partition("\n")
        body = " ".join(x.strip() for x in body.split("\n.")[0].split("\n")).strip()
        if len(summary) < 10 or len(body) < 40 or summary in seen:
            continue
        seen.add(summary)
        yield dict(name=p["Package"], section=p.get("Section", "misc"),
                   source=p.get("Source", p["Package"]).split()[0], query=summary, doc=body[:400])


def build(path, seed=0, eval_fraction=0.2, negatives=2):
    pkgs = list(packages(path))
    by_section, by_source = defaultdict(list), defaultdict(list)
    for p in pkgs:
        by_section[p["section"]].append(p)
        by_source[p["source"]].append(p)
    rng = random.Random(seed)
    train, evaluation = [], []
    for p in pkgs:
        pool = [o["doc"] for o in by_section[p["section"]] if o["doc"] != p["doc"]]
        graded = [{"text": o["doc"], "relevance": 0.5} for o in by_source[p["source"]][:2] if o["doc"] != p["doc"]]
        row = {"query": p["query"], "positive": p["doc"], "negatives": rng.sample(pool, min(negatives, len(pool)))}
        if graded:
            row["graded"] = graded
        bucket = int(hashlib.sha1(p["name"].encode()).hexdigest(), 16) % 100
        (evaluation if bucket < 100 * eval_fraction else train).append(row)
    return train, evaluation


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--status", default="/var/lib/dpkg/status")
    ap.add_argument("--out", default="examples/data")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in zip(("dpkg_train.jsonl", "dpkg_eval.jsonl"), build(args.status, args.seed)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{out / name}: {len(rows)} queries")


if __name__ == "__main__":
    main()
