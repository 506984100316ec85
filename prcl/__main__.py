"""`python -m prcl` / `prcl`: bench | train | encode | eval | export | gpu-check | compile-report.

Imports nothing heavy: each command's module is imported only when that command runs."""
import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "bench": ("prcl.tools.bench.cli", "main", "fused vs eager reference: time, peak memory, error vs float64"),
    "train": ("prcl.training", "train_main", "fine-tune a text encoder with PRCL"),
    "encode": ("prcl.training", "encode_main", "embed texts with a (LoRA-adapted) encoder"),
    "eval": ("prcl.retrieval", "main", "retrieval metrics (nDCG@10, recall, MRR, MAP) on a BEIR/TREC set"),
    "export": ("prcl.encoders.export", "main", "a trained encoder as a sentence-transformers model directory"),
    "gpu-check": ("prcl.tools.gpu_check", "main", "correctness, timings and peers on a CUDA GPU, to JSON and Markdown"),
    "compile-report": ("prcl.tools.compile_report", "main", "registers, spills and SASS per pair of every kernel config"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: prcl {" + ",".join(COMMANDS) + "} [options]\n")
        for name, (_, _, help_) in COMMANDS.items():
            print(f"  {name:16s}{help_}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, fn, _ = COMMANDS[argv[0]]
    return getattr(importlib.import_module(module), fn)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
