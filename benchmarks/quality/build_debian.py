"""Build extra training pairs from Debian's package index, offline: a package's one-line summary as the
query, its long description as the positive (issue 25: more data than the 492 man-pages training
queries).

    apt-get update -o Acquire::Languages=en          # once: brings the Translation-en index
    python benchmarks/quality/build_debian.py        # -> benchmarks/quality/data/debian/train.jsonl

Source: bookworm's main Translation-en index (long descriptions) joined with its Packages index
(Section) on Description-md5, read from /var/lib/apt/lists with apt's own `apt-helper cat-file`.
Kept: one package per description (the first by name), a long description of --min-words words or
more, whose summary is unique; documentation, data, debug and transitional packages are left out
(their descriptions repeat another package's). --packages of them, drawn with --seed, in the
`prcl train` JSONL layout, each line with --instruction. The descriptions are Debian's archive
metadata (each from its package's control file, under that package's terms); nothing of them is
committed here: `stats.json` records the indexes' names, sizes, sha256 and the counts.
"""
import argparse
import hashlib
import json
import random
import re
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
LISTS = Path("/var/lib/apt/lists")
INDEXES = {"translations": "*_debian_dists_bookworm_main_i18n_Translation-en*",
           "packages": "*_debian_dists_bookworm_main_binary-amd64_Packages*"}
LEFT_OUT = re.compile(r"(transitional|dummy) package|debug(ging)? symbols|\((documentation|data|common) files\)"
                      r"|documentation$", re.I)
INSTRUCTION = "Instruct: Given the one-line summary of a software package, retrieve its description.\nQuery:\n"


def index_text(pattern):
    """(path, text) of the one apt list matching pattern, decompressed by apt itself."""
    paths = sorted(LISTS.glob(pattern))
    if len(paths) != 1:
        raise SystemExit(f"expected one {pattern} in {LISTS}, found {len(paths)}: run "
                         "`apt-get update -o Acquire::Languages=en` first")
    out = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", str(paths[0])], check=True,
                         capture_output=True, text=True)
    return paths[0], out.stdout


def stanzas(text):
    """Every stanza of a deb822 index as {field: value}, continuation lines joined with newlines."""
    for block in text.split("\n\n"):
        fields, key = {}, None
        for line in block.splitlines():
            if line.startswith((" ", "\t")) and key:
                fields[key] += "\n" + line[1:]
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            yield fields


def long_text(body):
    """The long description as plain text: ' .' paragraph separators become blank lines."""
    lines = ["" if line.strip() == "." else line.strip() for line in body.splitlines()]
    return "\n".join(lines).strip()


def pairs(translations, packages, min_words):
    """[(package, summary, description)] after the rules of the module's docstring, sorted by package."""
    section = {p["Description-md5"]: p.get("Section", "") for p in stanzas(packages) if "Description-md5" in p}
    seen_md5, by_summary = set(), {}
    for st in sorted(stanzas(translations), key=lambda s: s.get("Package", "")):
        md5, desc = st.get("Description-md5"), st.get("Description-en", "")
        summary, _, body = desc.partition("\n")
        text = long_text(body)
        if (not md5 or md5 in seen_md5 or LEFT_OUT.search(summary) or section.get(md5, "").endswith(("doc", "debug"))
                or len(text.split()) < min_words):
            continue
        seen_md5.add(md5)
        by_summary.setdefault(summary.strip(), []).append((st["Package"], text))
    return [(found[0][0], summary, found[0][1]) for summary, found in sorted(by_summary.items()) if len(found) == 1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "data" / "debian"))
    ap.add_argument("--packages", type=int, default=4000, help="pairs drawn (default: 4000)")
    ap.add_argument("--min-words", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--instruction", default=INSTRUCTION)
    args = ap.parse_args()
    (tpath, translations), (ppath, packages) = index_text(INDEXES["translations"]), index_text(INDEXES["packages"])
    found = pairs(translations, packages, args.min_words)
    drawn = sorted(random.Random(args.seed).sample(found, min(args.packages, len(found))))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w") as f:
        for _, summary, text in drawn:
            f.write(json.dumps({"query": summary, "positive": [text],
                                "instruction": args.instruction}) + "\n")
    stats = {"indexes": {p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                         for p in (tpath, ppath)},
             "kept": len(found), "drawn": len(drawn), "seed": args.seed, "min_words": args.min_words,
             "train.jsonl sha256": hashlib.sha256((out / "train.jsonl").read_bytes()).hexdigest()}
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
