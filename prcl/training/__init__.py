"""`prcl train` / `prcl encode`: fine-tune a text encoder with PRCL (or InfoNCE) at any batch size.

    data.py       JSONL examples, streamed in shuffled blocks with a resumable position
    batching.py   B queries × N documents with sparse labels, duplicates excluded
    step.py       the batch loss and its backward, with cached embeddings (GradCache)
    config.py     TrainConfig: every option, checked
    loop.py       optimizer, schedule, metrics, the non-finite stop, exact resume
    checkpoint.py checkpoints without pickle: safetensors + JSON, SHA-256 manifest, fallback
    evaluation.py recall@k / MRR on --eval
    distributed.py  torchrun: process group, summed gradients
    cli.py        argument parsing and --config files
"""
from prcl.training.batching import Batch, build_batch
from prcl.training.cli import encode_main, train_main
from prcl.training.data import DataError, Example, ExampleStream, parse_example, read_examples
from prcl.training.config import TrainConfig
from prcl.training.evaluation import evaluate
from prcl.training.loop import train
from prcl.training.step import batch_loss, forward_backward, info_nce

__all__ = ["Batch", "build_batch", "encode_main", "train_main", "DataError", "Example", "ExampleStream",
           "parse_example", "read_examples", "TrainConfig", "evaluate", "train", "batch_loss",
           "forward_backward", "info_nce"]
