"""`python -m prcl bench`: prcl.fused_pair_bce against the eager reference on whatever device is present.

For each implementation: forward-only and forward+backward median time (with spread), TFLOP/s on the
2·B·N·D / 6·B·N·D basis, peak memory beyond the inputs, and the error of the loss and of the gradients
against float64 (prcl.backends.reference on float64 inputs, the same oracle the tests use). A line per
implementation as it completes, then the table; then the small batches (fwd+bwd at B = N = 32 and 128
on one thread, prcl vs eager), where the host's per-call work shows (--no-small leaves them out).

torch is imported after the arguments parse: `--help` and argument errors answer without it.
"""
import argparse
import gc
import time
from collections.abc import Sequence

from prcl.files import resolve_device
from prcl.tools.bench import DTYPE_NAMES, LABEL_FORMS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m prcl bench",
        description="prcl.fused_pair_bce vs the eager reference (and torch.compile of it, and open_clip / "
                    "siglip-kernel when installed): forward and forward+backward median time and spread, "
                    "TFLOP/s, peak memory, error vs float64.")
    p.add_argument("-B", "--batch", type=int, default=2048, help="queries B (default 2048)")
    p.add_argument("-N", "--docs", type=int, default=None,
                   help="documents N (default B; 8·B for --label-form hardneg)")
    p.add_argument("-D", "--dim", type=int, default=256, help="embedding dim D (default 256)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="input dtype (default fp32)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (default 10)")
    p.add_argument("--label-form", choices=LABEL_FORMS, default="diagonal",
                   help="diagonal: pair (i, i) positive; graded: (B,) relevance of pair (i, i); sparse: "
                        "(B, 4) labels with label_index; hardneg: diagonal among N = 8·B (default diagonal)")
    p.add_argument("--no-compile", action="store_true", help="leave out torch.compile of the reference")
    p.add_argument("--no-peers", action="store_true", help="leave out open_clip and siglip-kernel")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads); default: torch's choice")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--no-small", action="store_true",
                   help="leave out the small batches (fwd+bwd at B = N = 32, D = 64 and B = N = 128, D = 256 on "
                        "1 thread, prcl vs eager: the host's per-call overhead; about 2 s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f"argument --threads: must be >= 1, got {args.threads}")
    import torch

    from prcl.core.contract import check_inputs
    from prcl.tools.bench.cases import default_docs, make_case
    from prcl.tools.bench.peers import PEERS, SCALE, implementations
    from prcl.tools.bench.table import (
        load_text,
        measure,
        measure_small_batches,
        progress_line,
        render,
        render_small_batches,
    )
    from prcl.tools.bench.timing import load_average

    try:
        device = resolve_device(args.device)
    except ValueError as e:
        print(f"prcl bench: {e}")
        return 2
    N = args.docs or default_docs(args.batch, args.label_form)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        if min(args.batch, N, args.dim, args.repeats) < 1:
            raise ValueError(f"-B, -N, -D and --repeats must be >= 1, got B={args.batch} N={N} "
                             f"D={args.dim} repeats={args.repeats}")
        case = make_case(args.batch, N, args.dim, args.dtype, device, args.label_form, args.seed)
        check_inputs(case.q, case.d, case.labels, case.label_index, SCALE, None, "mean", None)
    except ValueError as e:
        print(f"prcl bench: {e}")
        return 2
    impls = implementations(device, compile_reference=not args.no_compile, peers=not args.no_peers)
    loads = [load_average()]
    print(f"prcl bench: {case.id} on {device.type}, {load_text(loads[0])}; each implementation: "
          f"{args.repeats} timed calls per mode, peak memory, error vs float64", flush=True)
    rows = []
    for impl in impls:
        t0 = time.perf_counter()
        row = measure(impl, case, args.repeats)
        # a peer that is simply not installed, or cannot take this case, is left out of the table
        if impl.name in PEERS and "problem" in row:
            continue
        print(progress_line(row, time.perf_counter() - t0), flush=True)
        rows.append(row)
        gc.collect()
    loads.append(load_average())
    print()
    print(render(rows, case, args.repeats, loads))
    if not args.no_small:
        print()
        print(render_small_batches(measure_small_batches(device, args.seed), device), flush=True)
    return 0
