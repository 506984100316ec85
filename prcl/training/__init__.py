"""`prcl train` / `prcl encode`: fine-tune a text encoder with PRCL (or InfoNCE) at any batch size.

    data.py       JSONL examples, streamed in shuffled blocks with a resumable position
    batching.py   B queries × N documents with sparse labels, duplicates excluded
    teacher.py    teacher-graded labels: a second encoder's cosines label every in-batch pair
    step.py       the batch loss and its backward, with cached embeddings (GradCache); contrastive_loss_step
    softmax.py    InfoNCE, the softmax baseline, on one process and across ranks
    config.py     TrainConfig: every option, checked
    loop.py       optimizer, schedule, metrics, the non-finite stop, exact resume
    checkpoint.py checkpoints without pickle: safetensors + JSON, SHA-256 manifest, fallback
    evaluation.py retrieval metrics on --eval (prcl.retrieval, as prcl eval)
    distributed.py  torchrun: process group, summed gradients
    cli.py        argument parsing and --config files

The public names load their modules (and torch) on first use, so that `prcl train --help` and
`prcl encode --help` answer without importing torch.
"""
import importlib
from typing import Any

_HOMES = {
    "Batch": "batching", "build_batch": "batching", "excluded_pairs": "batching",
    "encode_main": "cli", "train_main": "cli",
    "DataError": "data", "Example": "data", "ExampleStream": "data", "parse_example": "data",
    "read_examples": "data",
    "TrainConfig": "config", "eval_set_metrics": "evaluation", "train": "loop",
    "batch_loss": "step", "contrastive_loss_step": "step", "forward_backward": "step", "info_nce": "softmax",
}
# earlier names of functions that were renamed apart from a namesake (prcl.retrieval.evaluate)
_RENAMED = {"evaluate": "eval_set_metrics"}
__all__ = list(_HOMES) + list(_RENAMED)


def __getattr__(name: str) -> Any:
    home = _RENAMED.get(name, name)
    if home not in _HOMES:
        raise AttributeError(f"module 'prcl.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"prcl.training.{_HOMES[home]}"), home)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
