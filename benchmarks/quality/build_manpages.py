"""Build a graded-relevance retrieval set in the BEIR layout from the Linux man pages, sections 2 and 3
(Debian package manpages-dev), offline.

    python benchmarks/quality/build_manpages.py            # -> benchmarks/quality/data/manpages/

Query: the summary of a page's NAME line (the text after `\\-`; the function names before it are left
out, since the passage repeats them). Passage: the page's DESCRIPTION section as plain text.
Grades: the page itself 2; the section 2/3 pages named in its SEE ALSO 1 (aliases resolved, the page
itself not counted twice). Pages with the same summary form one query. Splits: disjoint queries,
60 / 10 / 30 % train / dev / test by a hash of the query id; one corpus for all splits.

Source: the installed manpages-dev when dpkg lists it, otherwise `apt-get download manpages-dev`
extracted with dpkg-deb into the output's parent folder. `stats.json` records the package version,
the counts and each file's sha256.
"""
import argparse
import glob
import gzip
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SECTIONS = ("2", "3")
SPLITS = (("train", 6), ("dev", 7), ("test", 10))  # hash % 10 below the bound

ESCAPES = {r"\-": "-", r"\(em": "—", r"\(en": "–", r"\(aq": "'", r"\(dq": '"', r"\(lq": '"', r"\(rq": '"',
           r"\(bu": "•", r"\(co": "©", r"\(mu": "×", r"\(<=": "<=", r"\(>=": ">=", r"\(ti": "~", r"\(ha": "^",
           r"\e": "\\", r"\ ": " ", r"\~": " ", r"\0": " ", r"\(rs": "\\", r"\(pi": "π"}
DROP = re.compile(r"\\f(\[[^\]]*\]|\(..|.)|\\s[-+]?\d|\\[hvwo]'[^']*'|\\\*(\[[^\]]*\]|\(..|.)|\\\((..)|\\\[[^\]]*\]"
                  r"|\\[&%|^c:,/!)]")
SEE_ALSO_REF = re.compile(r"([A-Za-z_][\w.:+-]*)\s*\((\d)[a-z]*\)")


def source_root(work):
    """(root directory holding usr/share/man, package version, set of page paths or None for all)."""
    listed = Path("/var/lib/dpkg/info/manpages-dev.list")
    if listed.exists():
        version = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "manpages-dev"], check=True,
                                 capture_output=True, text=True).stdout
        return Path("/"), version, {line.strip() for line in listed.read_text().splitlines()}
    work.mkdir(parents=True, exist_ok=True)
    debs = sorted(work.glob("manpages-dev_*.deb"))
    if not debs:
        subprocess.run(["apt-get", "download", "manpages-dev"], cwd=work, check=True)
        debs = sorted(work.glob("manpages-dev_*.deb"))
    root = work / "manpages-dev"
    if not root.exists():
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root)], check=True)
    version = subprocess.run(["dpkg-deb", "-f", str(debs[-1]), "Version"], check=True, capture_output=True,
                             text=True).stdout.strip()
    return root, version, None


def roff_text(lines):
    """Plain text of man(7) source lines: font and size escapes dropped, macros' arguments kept."""
    out = []
    for line in lines:
        if line.startswith((".\\\"", "'\\\"", ".TS", ".TE", ".ds", ".de", ".ie", ".el", ".if", ".nr", ".ft")):
            continue
        if line.startswith("."):
            macro, _, rest = line[1:].partition(" ")
            if macro in ("B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM", "SB"):
                try:
                    args = shlex.split(rest.replace("\\", "\\\\"))
                except ValueError:
                    args = rest.split()
                line = "".join(args) if len(macro) == 2 else " ".join(args)
            elif macro in ("TP", "PP", "LP", "P", "IP", "HP", "SS", "sp", "br", "in", "RS", "RE", "nf", "fi",
                           "EX", "EE", "ad", "na", "nh", "hy", "bP", "PD", "UR", "UE", "MT", "ME", "QS", "QE",
                           "PS", "PE", "TH", "SH", "ZN", "ti", "ne"):
                line = rest.strip('"') if macro in ("SS", "UR", "MT", "ZN") else ""
            else:
                continue
        for esc, repl in ESCAPES.items():
            line = line.replace(esc, repl)
        line = DROP.sub("", line).replace("T{", " ").replace("T}", " ").replace("\t", " ")
        out.append(line)
    return re.sub(r"\s+", " ", " ".join(out)).strip()


def sections(source):
    """{section name: [raw lines]} of a man page's source."""
    out, current = {}, None
    for line in source.splitlines():
        if line.startswith(".SH"):
            current = line[3:].strip().strip('"').upper()
            out.setdefault(current, [])
        elif current is not None:
            out[current].append(line)
    return out


def read_pages(root, listed):
    """(pages {id: source}, aliases {id: canonical id}) for sections 2 and 3; id = 'name.section'."""
    pages, aliases = {}, {}
    for sec in SECTIONS:
        for path in sorted(glob.glob(str(root / f"usr/share/man/man{sec}/*.{sec}.gz"))):
            rel = "/" + os.path.relpath(path, root)
            if listed is not None and rel not in listed:
                continue  # another package's page
            pid = os.path.basename(path)[: -len(".gz")]
            if os.path.islink(path):
                aliases[pid] = os.path.basename(os.path.realpath(path))[: -len(".gz")]
                continue
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
                source = f.read()
            first = next((ln for ln in source.splitlines() if ln.strip() and not ln.startswith(".\\\"")), "")
            if first.startswith(".so "):  # a roff include: an alias of the named page
                aliases[pid] = os.path.basename(first[4:].strip())
                continue
            pages[pid] = source
    return pages, aliases


def build(root, listed):
    pages, aliases = read_pages(root, listed)
    corpus, summary_of, see_also = {}, {}, {}
    for pid, source in pages.items():
        sec = sections(source)
        description = roff_text(sec.get("DESCRIPTION", []))
        name_line = " ".join(sec.get("NAME", []))
        if not description or "\\-" not in name_line:
            continue
        corpus[pid] = description
        summary_of[pid] = roff_text([name_line.split("\\-", 1)[1]])
        see_also[pid] = roff_text(sec.get("SEE ALSO", []))
    queries, qrels = {}, {}
    for pid in sorted(summary_of):
        text = summary_of[pid]
        qid = next((q for q, t in queries.items() if t.lower() == text.lower()), None)
        if qid is None:
            qid, queries[pid], qrels[pid] = pid, text, {}
        qrels[qid][pid] = 2
        for name, sec in SEE_ALSO_REF.findall(see_also[pid]):
            ref = f"{name}.{sec}"
            ref = aliases.get(ref, ref)
            if ref in corpus and qrels[qid].get(ref, 0) < 1:
                qrels[qid][ref] = 1
    return corpus, queries, qrels


def split_of(qid):
    h = int(hashlib.sha1(qid.encode()).hexdigest(), 16) % 10
    return next(name for name, bound in SPLITS if h < bound)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE / "data" / "manpages"), help="output directory (BEIR layout)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    root, version, listed = source_root(out.parent / "deb")
    corpus, queries, qrels = build(root, listed)
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    with open(out / "corpus.jsonl", "w") as f:
        for pid, text in corpus.items():
            f.write(json.dumps({"_id": pid, "title": "", "text": text}) + "\n")
    with open(out / "queries.jsonl", "w") as f:
        for qid, text in queries.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    counts = {"documents": len(corpus)}
    for name, _ in SPLITS:
        qids = [q for q in queries if split_of(q) == name]
        with open(out / "qrels" / f"{name}.tsv", "w") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for q in qids:
                for did, grade in sorted(qrels[q].items(), key=lambda x: (-x[1], x[0])):
                    f.write(f"{q}\t{did}\t{grade}\n")
        counts[name] = {"queries": len(qids), "grade 2": sum(g == 2 for q in qids for g in qrels[q].values()),
                        "grade 1": sum(g == 1 for q in qids for g in qrels[q].values())}
    files = ["corpus.jsonl", "queries.jsonl"] + [f"qrels/{name}.tsv" for name, _ in SPLITS]
    stats = {"source": f"manpages-dev {version} (Debian), sections {', '.join(SECTIONS)}", "counts": counts,
             "sha256": {f: sha256(out / f) for f in files}}
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    json.dump(stats, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
