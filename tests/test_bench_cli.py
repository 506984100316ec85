"""`python -m prcl bench` runs, prints a line per implementation as it completes and then a table with
sane numbers, says "n/a" with a reason when a column cannot be measured and warns when the timings
are noise; the CPU memory meter sees what it should; benchmarks/report.py renders."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prcl.core.contract import DEFAULT_SCALE
from prcl.tools import bench
from prcl.tools.bench import memory, peers, table

ROOT = Path(__file__).resolve().parents[1]
TINY = ["-B", "48", "-N", "61", "-D", "24", "--repeats", "2", "--device", "cpu"]


def _rows(out):
    """{implementation: [cells]} from the table under the dashed rule."""
    lines = out.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("---"))
    rows = {}
    for line in lines[rule + 1:]:
        if not line.strip():
            break
        name, cells = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        rows[name] = cells.split()
    return rows


def test_bench_prints_progress_then_a_table_with_sane_numbers(capsys):
    threads = torch.get_num_threads()
    assert bench.main(TINY + ["--no-compile", "--no-peers"]) == 0
    assert torch.get_num_threads() == threads  # the small batches' one thread is not left behind
    out = capsys.readouterr().out
    assert "B=48 N=61 D=24 fp32" in out and "device: CPU" in out
    assert f"scale={DEFAULT_SCALE:g}," in out  # the library's default, which every implementation uses
    rows = _rows(out)
    # one progress line per implementation, each printed before the table
    table_at = out.index("\nimplementation ")
    for name in rows:
        assert re.search(rf"^  {re.escape(name)}: fwd [\d.e+-]+ ms, fwd\+bwd [\d.e+-]+ ms \(spread \d+%\)",
                         out[:table_at], re.M), name
    if hasattr(os, "getloadavg"):
        assert re.search(r"^machine: load average [\d.]+ on \d+ CPUs? -> load average", out, re.M)
    prcl_row = next(v for k, v in rows.items() if k.startswith("prcl ("))
    eager = rows["eager reference"]
    for cells in (prcl_row, eager):
        # fwd ms ±IQR/2, TFLOP/s, fwd+bwd ms ±IQR/2, TFLOP/s, spread, x eager, peak fwd, peak f+b, errors
        fwd_ms, fb_ms = float(cells[0]), float(cells[3])
        assert 0 < fwd_ms < 5e3 and 0 < fb_ms < 5e3
        assert float(cells[2]) > 0 and float(cells[5]) > 0
        assert cells[6].endswith("%") and float(cells[6][:-1]) >= 0
        assert float(cells[8]) >= 0 and float(cells[9]) >= 0
        assert float(cells[10]) < 1e-5 and float(cells[11]) < 1e-4  # fp32 vs float64
    assert float(eager[7]) == 1.0
    # then the small batches, on one thread: the host's per-call overhead, prcl beside eager
    small = out[out.index("\nsmall batches: "):]
    assert "1 CPU thread" in small and "prcl (" in small
    for B, D in ((32, 64), (128, 256)):
        found = re.search(rf"^  B=N={B} D={D}: prcl ([\d.e+-]+) ±[\d.e+-]+ ms, eager ([\d.e+-]+) ±[\d.e+-]+ ms, "
                          r"x eager ([\d.]+)$", small, re.M)
        assert found and all(float(x) > 0 for x in found.groups()), small


def test_large_spread_and_busy_machine_are_warned():
    steady = {"name": "a", "fwd": [1.0, 1.0, 1.01, 1.0], "fwd+bwd": [2.0, 2.02, 2.0, 2.01]}
    noisy = {"name": "b", "fwd": [1.0, 1.0, 1.0, 1.0], "fwd+bwd": [1.0, 2.0, 3.0, 4.0]}
    assert table.warnings([steady], [(0.5, 2)]) == []
    spread_warning, = table.warnings([steady, noisy], [(0.5, 2)])
    assert "spread by up to 60%" in spread_warning  # IQR 1.5 s over median 2.5 s
    busy, = table.warnings([steady], [(0.5, 2), (3.5, 2)])
    assert "busy (load average 3.50 on 2 CPUs)" in busy


def test_compile_failure_is_reported_not_raised(capsys, monkeypatch):
    def broken():
        def fn(*args):
            raise RuntimeError("InductorError: no working C++ compiler\nlong traceback")

        return fn

    monkeypatch.setattr(peers, "compiled_reference", broken)
    assert bench.main(TINY + ["--no-peers", "--no-small"]) == 0
    out = capsys.readouterr().out
    assert _rows(out)["torch.compile(reference)"] == ["n/a"]
    assert "torch.compile(reference): n/a: RuntimeError: InductorError: no working C++ compiler" in out


def test_bad_sizes_are_refused_with_the_shapes(capsys):
    assert bench.main(["-B", "64", "-N", "32", "-D", "8", "--no-compile"]) == 2
    assert "N >= B" in capsys.readouterr().out


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "prcl", "bench", *TINY, "--label-form", "sparse",
                           "--no-compile", "--no-peers", "--no-small"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "labels=sparse" in done.stdout and "eager reference" in done.stdout
    assert "small batches" not in done.stdout


def allocation_step(n_floats):
    """A MemoryWorker factory (importable by name there): a step that allocates n float32s."""
    return lambda: torch.ones(n_floats).sum()


def test_cpu_memory_meter_sees_a_known_allocation_and_the_eager_matrix():
    # in this process glibc keeps its dynamic threshold: the meter refuses rather than misread
    with pytest.raises(RuntimeError, match="MALLOC_MMAP_THRESHOLD_"):
        bench.peak_memory(allocation_step(16), "cpu")
    worker = memory.MemoryWorker()
    try:
        peak, why = worker.measure(allocation_step, 16 << 20)  # 64 MiB
        assert why is None and 63 <= peak / 2**20 < 72
    finally:
        worker.close()
    # the eager reference holds several 512×512 fp32 matrices, prcl a bounded workspace
    case = bench.make_case(512, 512, 64)
    eager, why = bench.measure_peak_memory("eager", bench.Step(bench.reference_loss, case, "fwd"), case)
    assert why is None and eager >= 4 * 512 * 512 * 4
    ours, why = bench.measure_peak_memory("prcl", bench.Step(bench.prcl_loss(), case, "fwd"), case)
    assert why is None and ours < eager


def test_report_renders_table_and_plot(tmp_path):
    spec = importlib.util.spec_from_file_location("prcl_bench_report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    benches = []
    for impl, scale in (("prcl", 1.0), ("eager", 3.0)):
        for B in (256, 512):
            info = dict(impl=impl, impl_label=impl, B=B, N=B, D=64, dtype="fp32", label_form="diagonal",
                        mode="fwd+bwd", tflops=0.1, peak_bytes=B * 1024 * scale, device="cpu",
                        device_name="CPU test", prcl_version="0", torch_version="t", triton_version="x",
                        threads=2, load_avg_1m=0.5)
            stats = dict(median=1e-3 * scale * B / 256, iqr=1e-5, rounds=5)
            benches.append(dict(group="g", name=f"{impl}-{B}", stats=stats, extra_info=info))
    path = tmp_path / "run.json"
    path.write_text(json.dumps(dict(benchmarks=benches, datetime="2026-11-25T00:00:00",
                                    machine_info={"python_version": "3.11"}, version="5.2.3")))
    assert report.main([str(path), "--out", str(tmp_path / "out"), "--command", "pytest x"]) == 0
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| fp32 | 64 | diagonal | fwd+bwd | 512 | 512 | 2 ±0.005 ms · 0.5 MiB | 6 ±0.005 ms · 1.5 MiB | 3.00x |" in table
    assert (tmp_path / "out" / "plot.png").stat().st_size > 1000
    assert "`pytest x`" in (tmp_path / "out" / "README.md").read_text()
