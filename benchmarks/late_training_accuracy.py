"""Late-training accuracy: relative error against float64 of prcl and of the eager formula in the
same dtype, where positives sit at cosine ≈ 1 and σ(z_ii) → 1 (the README's accuracy table).

    TRITON_INTERPRET=1 python benchmarks/late_training_accuracy.py [--size 512] [--dim 128]

Errors are max |x − gold| / max |gold| per output (loss, dq, dd, dscale, dbias), gold = the eager
reference in float64 on the same rounded inputs; one row per (dtype, labels, cosine, scale, bias).
"""
import argparse
import math

import torch

import prcl
from prcl.backends.reference import pair_bce
from prcl.testing import late_training_inputs, loss_and_grads


def errors(out, gold):
    # max |gold| itself, not prcl.testing.rel_err's floor of 0.1: a mean loss's gradients are far below 0.1
    return [((x.double() - g).abs().max() / g.abs().max()).item() for x, g in zip(out, gold)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="B = N")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--backends", default="native,torch,triton")
    args = ap.parse_args()
    B = N = args.size
    backends = args.backends.split(",")
    print(f"B = N = {B}, D = {args.dim}; max error of (loss, dq, dd, dscale, dbias) relative to max |float64|")
    print("| dtype | labels | cos | t | b | eager | " + " | ".join(f"prcl {b}" for b in backends) + " |")
    print("|---" * (6 + len(backends)) + "|")
    for dtype in (torch.bfloat16, torch.float16):
        for cos, scale, bias in ((0.9, 10.0, -math.log(N - 1)), (0.95, 20.0, -10.0), (0.98, 30.0, -12.0)):
            q, d, _ = late_training_inputs(B, N, args.dim, cos)
            for name, labels in (("diagonal", None), ("graded 1.0", torch.ones(B))):
                inputs = (q.to(dtype), d.to(dtype), labels, None)
                gold = loss_and_grads(pair_bce, *inputs, torch.float64, "mean", scale, bias)
                cells = [errors(loss_and_grads(pair_bce, *inputs, dtype, "mean", scale, bias), gold)]
                for backend in backends:
                    fn = lambda *a, **k: prcl.fused_pair_bce(*a, backend=backend, **k)  # noqa: E731
                    cells.append(errors(loss_and_grads(fn, *inputs, dtype, "mean", scale, bias), gold))
                fmt = [" / ".join(f"{e:.1e}" for e in c[:3]) for c in cells]
                print(f"| {str(dtype)[6:]} | {name} | {cos} | {scale:g} | {bias:.3g} | " + " | ".join(fmt) + " |")
    print("cells: loss / dq / dd errors")


if __name__ == "__main__":
    main()
