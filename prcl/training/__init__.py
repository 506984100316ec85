"""`prcl train` / `prcl encode`: fine-tune a text encoder with PRCL (or InfoNCE) at any batch size.

    data.py       JSONL examples, streamed in shuffled blocks with a resumable position
    batching.py   B queries × N documents with sparse labels, duplicates excluded
    step.py       the batch loss and its backward, with cached embeddings (GradCache)
    loop.py       optimizer, schedule, evaluation, metrics, atomic checkpoints, exact resume
    distributed.py  torchrun: process group, summed gradients
    cli.py        argument parsing and --config files
"""
from prcl.training.batching import Batch, build_batch
from prcl.training.cli import encode_main, train_main
from prcl.training.data import DataError, Example, ExampleStream, parse_example, read_examples
from prcl.training.loop import TrainConfig, evaluate, train
from prcl.training.step import batch_loss, forward_backward, info_nce

__all__ = ["Batch", "build_batch", "encode_main", "train_main", "DataError", "Example", "ExampleStream",
           "parse_example", "read_examples", "TrainConfig", "evaluate", "train", "batch_loss",
           "forward_backward", "info_nce"]
