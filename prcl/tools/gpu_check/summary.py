"""summary.md: the sections' status, then the correctness failures, the late-training errors, the sync and
graph checks, the timings and the LoRA step as tables."""
from typing import Any


def status(rec: dict[str, Any]) -> str:
    if "error" in rec:
        return "ERROR"
    if "not_applicable" in rec:
        return "n/a"
    if rec.get("passed") is False:
        return "FAIL"
    return "pass" if rec.get("passed") else "done"


def _fmt(v: object) -> str:
    return "—" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return out


def summary(results: dict[str, Any]) -> str:
    env = results["sections"].get("environment", {})
    lines = ["# prcl GPU check", "", f"Command: `{env.get('command')}`  ", f"Date: {env.get('date')}  ",
             f"Device: {env.get('device')}  ", f"Versions: {env.get('versions')}  ", f"Commit: {env.get('commit')}", "",
             "| section | status | seconds | note |", "|---|---|---|---|"]
    for name, rec in results["sections"].items():
        note = rec.get("error") or rec.get("not_applicable") or ""
        lines.append(f"| {name} | {status(rec)} | {rec['seconds']:.0f} | {note} |")
    if "running" in results:
        lines.append(f"| {results['running']} | did not finish | — | the process ended inside it: see log.txt |")
    sections = results["sections"]
    if "correctness" in sections and sections["correctness"].get("rows"):
        rec = sections["correctness"]
        lines += ["", "## Correctness", "", rec["rule"], "",
                  f"{sum(r['passed'] for r in rec['rows'])} of {len(rec['rows'])} cases pass."]
        if rec.get("failed"):
            lines += [""] + _table(rec["failed"], ["case", "dtype", "form", "layout", "reduction", "regime", "design", "worst", "error"])
        late = [dict(r, **{k: r[k]["err"] for k in ("loss", "dq", "dd")}) for r in rec["rows"]
                if r.get("regime") == "late" and "loss" in r]
        if late:
            lines += ["", "Late-training regime (cos 0.95, scale 20, bias −10), errors relative to max |gold|:", ""]
            lines += _table(late, ["case", "dtype", "form", "design", "loss", "dq", "dd", "passed"])
    for name in ("no_host_sync", "cuda_graph"):
        if sections.get(name, {}).get("rows"):
            lines += ["", f"## {name}", ""] + _table(sections[name]["rows"], list(sections[name]["rows"][0]))
    if sections.get("timings", {}).get("rows"):
        rec = sections["timings"]
        lines += ["", "## Timings", "", f"{rec['timer']}; scale {_fmt(rec.get('scale'))}, bias −log(N−1); memory: "
                  f"{rec['memory']}.", ""]
        lines += _table(rec["rows"], ["case", "B", "N", "D", "dtype", "mode", "impl", "ms", "iqr_ms", "tflops",
                                      "peak_gib", "error"])
    if sections.get("lora_step", {}).get("rows"):
        rec = sections["lora_step"]
        lines += ["", "## LoRA step", "", f"Model: {rec.get('model')}; batch: {rec.get('batch')}; packed attention: "
                  f"{rec.get('packed_attention')} ({rec.get('varlen_kernel') or 'no varlen kernel'}).", ""]
        lines += _table(rec["rows"], ["batch", "ms", "iqr_ms", "tokens_per_s", "peak_gib", "error"])
    return "\n".join(lines) + "\n"
