"""Section 4: forward+backward captured in a CUDA graph, replayed on new input values, against eager."""
import traceback
from typing import Any

import torch

from prcl.testing import OUTPUTS, pair_inputs
from prcl.tools.gpu_check.common import Check, error_line, log
from prcl.tools.gpu_check.no_host_sync import loss_call


def section(ck: Check, rec: dict[str, Any]) -> None:
    if not ck.cuda:
        rec["not_applicable"] = "CUDA graphs need CUDA"
        return
    rows = rec["rows"] = []
    for form in ("diagonal", "dense", "sparse"):
        try:
            rows.append(dict(form=form, **_graph_replay(ck, form)))
        except Exception as e:  # noqa: BLE001 (a capture failing for one label form must not hide the others)
            rows.append(dict(form=form, passed=False, error=error_line(e)))
            log.error("cuda graph (%s) failed:\n%s", form, traceback.format_exc())
    rec["passed"] = all(r["passed"] for r in rows)


def _graph_replay(ck: Check, form: str) -> dict[str, Any]:
    """Capture forward+backward, replay it on new input values, compare with an eager step on them."""
    step, (q, d, t, b) = loss_call(ck, form, 512, 2048, 128, torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside capture, as torch.cuda.graph asks
            for x in (q, d, t, b):
                x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    for x in (q, d, t, b):
        x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    new_q, new_d, _ = pair_inputs(q.shape[0], d.shape[0], q.shape[1], seed=7, device=ck.device)
    with torch.no_grad():  # new values into the captured inputs: the replay must recompute
        q.copy_(new_q)
        d.copy_(new_d)
    graph.replay()
    torch.cuda.synchronize()
    replayed = [loss.clone()] + [x.grad.clone() for x in (q, d, t, b)]
    for x in (q, d, t, b):
        x.grad = None
    eager = [step().detach()] + [x.grad for x in (q, d, t, b)]
    diffs = [(r.float() - e.float()).abs().max().item() for r, e in zip(replayed, eager)]
    return dict(max_abs_diff=dict(zip(OUTPUTS, diffs)),
                passed=all(x <= 1e-6 * max(1.0, e.float().abs().max().item()) for x, e in zip(diffs, eager)))
