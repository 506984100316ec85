"""Section 2: the CUDA loss and gradients against float64, under prcl.testing's accuracy rule."""
import functools
import traceback
from typing import Any

import torch

from prcl.testing import DTYPES, FLOOR, FORMS, LATE_FLOOR, judge, labels_with_exclusions, loss_and_grads, pair_inputs
from prcl.tools.gpu_check.common import Check, error_line, log

MASK_MARGIN = -0.3  # the false-negative margin of the "masked" cases: masks pairs in every case of every form
RULE = "err(prcl) <= 2 * err(eager, same dtype) + floor; errors relative to max |float64 gold|"


def compare(ck: Check, dtype_name: str, B: int, N: int, D: int, form: str, layout: str, reduction: str,
            regime: str = "plain", design: str = "default", seed: int = 0) -> dict[str, Any]:
    """One correctness row: prcl vs eager vs float64 gold on the same rounded inputs. regime: "plain",
    "late" (late training) or "masked" (the false-negative mask at MASK_MARGIN); design: the Triton
    gradient's, "default" (the launcher's choice) or "two-pass" (forced)."""
    import prcl
    from prcl.backends.reference import pair_bce

    dtype = DTYPES[dtype_name]
    late, margin = regime == "late", MASK_MARGIN if regime == "masked" else None
    q, d, gen = pair_inputs(B, N, D, dtype, seed=seed, cos=0.95 if late else None, device=ck.device)
    labels, label_index = labels_with_exclusions(form, B, N, gen, device=ck.device, converged=late)
    scale, bias = (20.0, -10.0) if late else (7.0, -3.0)
    args = (q, d, labels, label_index)
    gold = loss_and_grads(pair_bce, *args, torch.float64, reduction, scale, bias, false_negative_margin=margin)
    eager = loss_and_grads(pair_bce, *args, dtype, reduction, scale, bias, false_negative_margin=margin)
    fused_fn = functools.partial(prcl.fused_pair_bce, backend=ck.backend)
    from prcl.backends.triton_impl import gradient_design

    with gradient_design("two-pass" if design == "two-pass" else None):
        fused = loss_and_grads(fused_fn, *args, dtype, reduction, scale, bias, layout=layout,
                               false_negative_margin=margin)
    floor = (LATE_FLOOR if late else FLOOR)[dtype]
    row = dict(case=f"B{B}-N{N}-D{D}", dtype=dtype_name, form=form, layout=layout, reduction=reduction,
               regime=regime, design=design, passed=True, worst=None)
    if margin is not None:  # the mask must have masked something for the case to test it
        row["masked_pairs"] = int(prcl.fused_pair_bce(q, d, labels, label_index=label_index, backend=ck.backend,
                                                      false_negative_margin=margin, return_masked=True)[1])
        row["passed"] = row["masked_pairs"] > 0
    verdicts = judge(fused, eager, gold, floor)
    row.update(verdicts)
    row["passed"] &= all(v["ok"] for v in verdicts.values())
    row["worst"] = max(((name, v["err"] / (2 * v["eager_err"] + floor)) for name, v in verdicts.items()),
                       key=lambda worst: worst[1])
    return row


def correctness_cases(dry_run: bool) -> list[tuple[str, int, int, int, str, str, str, str, str]]:
    """(dtype, B, N, D, form, layout, reduction, regime, design) in order of importance: if the time box
    ends the section, the late-training regime, the false-negative mask and the multi-panel case have
    run. Each 16-bit case with D ≤ TWO_PASS_MAX_D runs twice: with the launcher's gradient design and
    with the two-pass design forced. The diagonal and graded forms pair query i with document i, so they
    take only the shapes with N >= B. The masked cases are small: a pair within rounding of its row's
    threshold could be masked by one side of the comparison and not the other."""
    from prcl.backends.tuning import TWO_PASS_MAX_D

    late = (32, 48, 40) if dry_run else (512, 512, 128)
    cases = [(dtype, *late, form, "contiguous", "mean", "late") for dtype in ("bf16", "fp16") for form in FORMS]
    masked = [(20, 40, 24)] if dry_run else [(64, 256, 96), (64, 256, 768)]
    cases += [(dtype, *shape, form, "contiguous", "mean", "masked") for shape in masked
              for dtype in (("bf16",) if dry_run else ("bf16", "fp32")) for form in FORMS]
    if not dry_run:  # more than one G panel (prcl.backends.triton_impl.PANEL_ELEMS = 8192²) in both directions
        cases.append(("bf16", 8200, 8300, 64, "sparse", "contiguous", "mean", "plain"))
    if dry_run:  # the interpreter takes about a second a case
        shapes, dtypes = [(5, 6, 7), (17, 40, 20), (9, 4, 12)], ("bf16",)
    else:
        shapes = [(1, 1, 8), (7, 13, 33), (130, 67, 100), (257, 1030, 72), (96, 4099, 768)]
        dtypes = ("bf16", "fp16", "fp32")
    layouts = ("contiguous", "sliced", "transposed")
    for k, (B, N, D) in enumerate(shapes):
        for dtype in dtypes:
            for form in FORMS if N >= B else ("dense", "sparse"):
                for reduction in ("mean", "none"):
                    cases.append((dtype, B, N, D, form, layouts[(k + len(cases)) % 3], reduction, "plain"))
    return [(*c, design) for c in cases
            for design in ("default", "two-pass")[:2 if c[0] != "fp32" and c[3] <= TWO_PASS_MAX_D else 1]]


def section(ck: Check, rec: dict[str, Any]) -> None:
    rec["rule"] = RULE
    rec["floors"] = {regime: {name: floor[dtype] for name, dtype in DTYPES.items()}
                     for regime, floor in (("plain", FLOOR), ("late", LATE_FLOOR))}
    rows = rec["rows"] = []
    for dtype, B, N, D, form, layout, reduction, regime, design in correctness_cases(ck.dry_run):
        try:
            rows.append(compare(ck, dtype, B, N, D, form, layout, reduction, regime, design))
        except Exception as e:  # noqa: BLE001 (one failing case must not hide the others)
            rows.append(dict(case=f"B{B}-N{N}-D{D}", dtype=dtype, form=form, layout=layout, reduction=reduction,
                             regime=regime, design=design, passed=False, error=error_line(e)))
            log.error("correctness case failed:\n%s", traceback.format_exc())
    rec["passed"] = all(r["passed"] for r in rows)
    rec["failed"] = [r for r in rows if not r["passed"]]
