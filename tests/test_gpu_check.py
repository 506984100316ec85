"""`python -m prcl gpu-check --dry-run` runs every section end to end on CPU and writes its few files;
a failing or overrunning section is recorded and the others still run."""
import json
import os
import subprocess
import sys
import time

import pytest

from prcl.core.contract import check_inputs
from prcl.testing import DTYPES, FORMS, labels_with_exclusions, pair_inputs
from prcl.tools import gpu_check


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "prcl.tools.gpu_check", "--out", str(out), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=900)
    return proc, out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_dry_run_passes_and_writes_few_files(dry_run):
    proc, out, results = dry_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "results.json", "summary.md"]
    assert list(results["sections"]) == [name for name, _, _ in gpu_check.SECTIONS]
    assert all("error" not in rec for rec in results["sections"].values())
    summary = (out / "summary.md").read_text()
    for name, _, _ in gpu_check.SECTIONS:
        assert f"| {name} |" in summary


@pytest.mark.slow
def test_environment_names_device_versions_and_command(dry_run):
    env = dry_run[2]["sections"]["environment"]
    assert "prcl.tools.gpu_check" in env["command"] and "--dry-run" in env["command"]
    assert env["versions"]["torch"] and env["versions"]["prcl"] and env["device"]["name"]


@pytest.mark.slow
def test_correctness_covers_every_form_layout_reduction_and_the_late_regime(dry_run):
    rec = dry_run[2]["sections"]["correctness"]
    rows = rec["rows"]
    assert rec["passed"] and all(r["passed"] for r in rows)
    assert {r["form"] for r in rows} == set(FORMS)
    assert {r["layout"] for r in rows} == {"contiguous", "sliced", "transposed"}
    assert {r["reduction"] for r in rows} == {"mean", "none"}
    masked = [r for r in rows if r["regime"] == "masked"]
    assert {r["form"] for r in masked} == set(FORMS) and all(r["masked_pairs"] > 0 for r in masked)
    late = [r for r in rows if r["regime"] == "late"]
    assert {r["form"] for r in late} == set(FORMS) and {r["dtype"] for r in late} == {"bf16", "fp16"}
    for r in rows:
        for q in ("loss", "dq", "dd", "dscale", "dbias"):
            assert r[q]["ok"] and r[q]["err"] >= 0 and r[q]["eager_err"] >= 0


@pytest.mark.slow
def test_sync_and_graph_sections_say_what_cpu_cannot_check(dry_run):
    sections = dry_run[2]["sections"]
    assert "CUDA" in sections["no_host_sync"]["not_applicable"]
    assert {(r["form"], r["reduction"], r["margin"]) for r in sections["no_host_sync"]["rows"]} == {
        (f, r, m) for f in FORMS for r in ("mean", "none") for m in (None, 0.0)}
    assert "CUDA" in sections["cuda_graph"]["not_applicable"]


@pytest.mark.slow
def test_timings_time_every_case_and_record_missing_peers(dry_run):
    rows = dry_run[2]["sections"]["timings"]["rows"]
    cases = {r["case"] for r in rows}
    assert {"main", "fwd vs GEMM", "fp32"} <= cases and sum(c.startswith("D=") for c in cases) >= 2
    assert {r["impl"] for r in rows if r["case"].startswith("design")} == {*gpu_check.peers.DESIGNS, "3-GEMM floor"}
    for r in rows:
        if r["impl"] in ("prcl", "eager", "3-GEMM floor", "gemm", *gpu_check.peers.DESIGNS):
            assert "error" not in r and r["ms"] > 0 and r["rounds"] >= 3, r
        else:
            assert ("ms" in r) != ("error" in r), r  # a peer either ran or says why not
    assert any(r["impl"] == "siglip-kernel" and "CUDA" in r["error"] for r in rows)


@pytest.mark.slow
def test_lora_step_padded_and_packed(dry_run):
    rec = dry_run[2]["sections"]["lora_step"]
    assert [r["batch"] for r in rec["rows"]] == ["padded", "packed"]
    assert all(r["tokens_per_s"] > 0 for r in rec["rows"]), rec["rows"]
    assert rec["batch"]["tokens"] > 0 and rec["batch"]["trainable_params"] > 0


def test_every_gpu_correctness_case_passes_the_input_checks():
    """The GPU run's own case list (not the dry run's), through the checks every backend applies first: a case
    its label form cannot take (the diagonal forms with B > N) would fail before any kernel ran."""
    cases = gpu_check.correctness.correctness_cases(dry_run=False)
    assert any(B > N for _, B, N, *_ in cases) and {c[4] for c in cases} == set(FORMS)
    assert {c[-1] for c in cases} == {"default", "two-pass"}
    for _dtype, B, N, D, form, _layout, reduction, regime, _design in cases:
        q, d, gen = pair_inputs(B, N, D, cos=0.95 if regime == "late" else None)
        labels, label_index = labels_with_exclusions(form, B, N, gen, converged=regime == "late")
        check_inputs(q, d, labels, label_index, 7.0, -3.0, reduction, "triton")


def test_every_gpu_masked_case_masks_some_pairs():
    """The GPU run's false-negative cases count as passed only where the mask masked something: with prcl.testing's
    inputs and MASK_MARGIN, each one does (counted here by the PyTorch backend)."""
    import prcl

    masked = [c for c in gpu_check.correctness.correctness_cases(dry_run=False) if c[7] == "masked"]
    assert {c[4] for c in masked} == set(FORMS)
    for dtype, B, N, D, form, *_ in masked:
        q, d, gen = pair_inputs(B, N, D, DTYPES[dtype])
        labels, label_index = labels_with_exclusions(form, B, N, gen)
        _, count = prcl.fused_pair_bce(q, d, labels, label_index=label_index, backend="torch", return_masked=True,
                                       false_negative_margin=gpu_check.correctness.MASK_MARGIN)
        assert count.item() > 0, (dtype, B, N, D, form)


def test_failing_and_overrunning_sections_are_isolated(tmp_path, monkeypatch):
    def broken(ck, rec):
        rec["rows"] = ["partial"]
        raise RuntimeError("section broke")

    def slow(ck, rec):
        time.sleep(5)

    def fine(ck, rec):
        rec["passed"] = True

    monkeypatch.setattr(gpu_check, "SECTIONS", (("broken", 10, broken), ("slow", 0.2, slow), ("fine", 10, fine)))
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run"]) == 1
    sections = json.loads((tmp_path / "results.json").read_text())["sections"]
    assert sections["broken"]["error"] == "RuntimeError: section broke"
    assert "section broke" in sections["broken"]["traceback"] and sections["broken"]["rows"] == ["partial"]
    assert "time box" in sections["slow"]["error"] and sections["slow"]["seconds"] < 3
    assert sections["fine"]["passed"] and "error" not in sections["fine"]
    assert "section broke" in (tmp_path / "log.txt").read_text()
    assert "| fine | pass |" in (tmp_path / "summary.md").read_text()


def test_a_hung_section_leaves_the_earlier_results_and_a_traceback(tmp_path):
    """A call stuck where Python's time box cannot reach it (here: a C sleep with SIGALRM ignored, as inside a
    hung CUDA synchronize) is ended by the C-level watchdog: the process exits, the finished sections' results
    and summary are on disk, the summary names the section that hung and log.txt holds its traceback."""
    script = f"""
import signal, sys, time
from prcl.tools import gpu_check
def fine(ck, rec):
    rec["passed"] = True
def hung(ck, rec):
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    time.sleep(60)
gpu_check.WATCHDOG_GRACE_S = 1
gpu_check.SECTIONS = (("fine", 10, fine), ("hung", 1, hung))
sys.exit(gpu_check.main(["--out", {str(tmp_path)!r}, "--dry-run"]))
"""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50)
    assert proc.returncode != 0 and time.perf_counter() - t0 < 30
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["running"] == "hung" and results["sections"]["fine"]["passed"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| fine | pass |" in summary and "| hung | did not finish |" in summary
    assert "Timeout" in (tmp_path / "log.txt").read_text() and "in hung" in (tmp_path / "log.txt").read_text()
