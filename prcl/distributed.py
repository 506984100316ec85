"""The global-batch loss across ranks: local queries scored against every rank's documents.

    Σ_r loss_r == prcl.fused_pair_bce(cat_r q_r, cat_r d_r, Y_global)   (rank r returns loss_r)

Semantics (rank r of R holds q_r (B_r, D), d_r (N_r, D); off_r = N_0 + … + N_{r−1}; N = Σ N_r, B = Σ B_r):

- Local query i of rank r is scored against all N documents; rank r's documents sit at global rows
  off_r … off_r + N_r − 1 (the concatenation in rank order). Local sizes may differ between ranks.
- labels=None / graded (B_r,): pair (local query i, local document i), i.e. global document off_r + i;
  requires N_r ≥ B_r on every rank. labels (B_r, K) + label_index: indices are local document rows
  (−1 pads). Dense labels (B_r, N_r) label the local documents only: every other rank's document is a
  negative (y = 0) for rank r's queries. Labels < 0 exclude a pair, as in one process.
- bias=None is −log(N − 1) with the GLOBAL N.
- reduction="mean" divides rank r's sum by the global B, "sum" returns rank r's sum: either way the
  values summed over ranks equal the single-process loss on the concatenated batch. "none" returns
  rank r's per-query losses (B_r,), the single-process rows of its queries.
- false_negative_margin: rank r's queries' thresholds come from their labelled pairs, which are on
  rank r; a pair of another rank's document is masked like any y = 0 pair. return_masked counts the
  masked pairs of rank r's queries (the counts sum over ranks to the one-process count).
- Gradients: every rank must call backward (the backward is collective). Then q_r.grad and d_r.grad
  are exactly the single-process gradient rows of rank r's data: the gradient that other ranks'
  queries send to d_r comes back through the collective. A scale/bias tensor gets only rank r's share;
  the sum over ranks is the single-process gradient (all-reduce with SUM if it is not in DDP/FSDP).
- Every rank must make the same call (strategy, reduction, D, dtype, grad mode, d.requires_grad,
  scale and bias values). A rank whose inputs fail the checks raises its ValueError and every other
  rank raises a ValueError naming it, after one small all-gather: bad input never leaves ranks
  waiting in a collective. Inputs are checked once per call, not per chunk.
- A rank that fails *outside* this call (an exception caught and survived, a crashed process) leaves
  its peers blocked in their next collective until the process group's timeout: gloo's default is
  30 minutes. Pass `timeout=datetime.timedelta(minutes=...)` to `init_process_group` to bound it.

DDP and FSDP. Both average gradients over the data-parallel ranks (DDP's all-reduce divides by its
world size W; FSDP1 pre/post-divides by W in total; FSDP2's reduce-scatter averages over the shard
group, and over shard × replicate for HSDP). The encoder's gradient of the global loss L = Σ_r loss_r
is the SUM over ranks of the per-rank parameter gradients, so the average is L's gradient / W.
Multiply the loss by `ddp_loss_scale(group)` (= R, the loss group's size) before backward and DDP's or
FSDP's average becomes exactly ∂L/∂θ:

    loss = prcl.fused_pair_bce(q, d, process_group=pg) * prcl.distributed.ddp_loss_scale(pg)

Equivalently keep the loss and make the reduction a sum (FSDP2: `model.set_gradient_divide_factor(1.0)`;
DDP: a comm hook that all-reduces without dividing). With plain SGD a W-times larger learning rate is
the same thing; Adam is nearly invariant to the factor, but gradient clipping thresholds are not. If
the loss group is a subgroup of the data-parallel group (gather within a node, DP across nodes), the
factor R still makes the update the average over loss groups of each group's exact gradient. To log
the global loss, all-reduce (SUM) the detached unscaled loss.

Strategies (both deterministic: fixed communication and summation order):
- "gather" (default): all-gather the documents with autograd (padded to the largest N_r; padding is
  sliced off before the loss, so it never contributes), one fused call with the labels shifted to
  global rows; the document gradient is reduce-scattered back in float32. Holds all N documents.
- "ring": the document chunks travel around the ring; a rank holds two chunks at a time (the one it
  computes on, the one in flight), so communication overlaps the fused kernel. With a scalar
  reduction and gradients needed, the gradient is computed during the forward ring (6·B·N·D, as the
  one-process `total` op) and the document-gradient accumulators travel with their chunks, one hop
  behind, so each rank ends with its own documents' gradient; backward only rescales. For
  reduction="none" the backward runs the ring again with the per-query upstream gradients.
  Holds two document chunks and three gradient chunks, whatever R is.

Pick the strategy with `strategy=` here, or through `prcl.fused_pair_bce` by passing
`process_group=Ring(group)` (or `Gather(group)`; `group=None` = the default group).
"""
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor

from prcl.core import loss
from prcl.core.contract import (
    DEFAULT_SCALE,
    DTYPES,
    REDUCTIONS,
    LossOutput,
    Scalar,
    check_inputs,
    check_margin,
    default_bias,
)
from prcl.core.labels import KernelLabels, kernel_labels, no_pairs, offset_labels
from prcl.core.ops import resolve_backend

STRATEGIES = ("gather", "ring")
# float32 gradients w.r.t. q, d, scale, bias (None where not wanted): loosely typed inside the ring, whose
# accumulators start as None
Grads4 = tuple[Any, ...]


@dataclass(frozen=True)
class Gather:
    """`process_group=Gather(group)`: the all-gather strategy (the default for a bare group).

    Args:
        group: a torch.distributed process group; None is the default group.
    """
    group: object = None
    strategy = "gather"


@dataclass(frozen=True)
class Ring:
    """`process_group=Ring(group)`: the ring strategy, two document chunks in memory at a time.

    Args:
        group: a torch.distributed process group; None is the default group.
    """
    group: object = None
    strategy = "ring"


def _unwrap(process_group: object, strategy: str | None) -> tuple[Any, str]:
    if isinstance(process_group, (Gather, Ring)):
        if strategy is not None and strategy != process_group.strategy:
            raise ValueError(f"strategy={strategy!r} contradicts process_group={process_group!r}")
        return process_group.group, process_group.strategy
    strategy = "gather" if strategy is None else strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    return process_group, strategy


def ddp_loss_scale(process_group: object = None) -> float:
    """The factor to multiply the loss by so that DDP's/FSDP's gradient average over the ranks is
    the gradient of the global loss Σ_r loss_r: the loss group's world size (see the module doc).

    Args:
        process_group: the group the loss is gathered over (a group, None for the default group, or
            Ring/Gather of one).

    Returns:
        float: the group's world size R.

    Example (under torchrun, the encoder wrapped in DDP or FSDP):

        loss = prcl.fused_pair_bce(q, d, process_group=pg) * ddp_loss_scale(pg)
        loss.backward()   # DDP's average over the R ranks is now the global loss's gradient
    """
    group, _ = _unwrap(process_group, None)
    return float(dist.get_world_size(group))


# --- handshake: sizes and agreement, one small all-gather ------------------------------------------

_FIELDS = ("ok", "B", "N", "D", "dtype", "needs_grad", "d_grad", "strategy", "reduction", "scale",
           "bias_given", "bias")
_AGREE = ("D", "dtype", "needs_grad", "d_grad", "strategy", "reduction", "scale", "bias_given", "bias")
_WHAT = {"D": "embedding dim", "dtype": "dtype", "needs_grad": "grad mode / requires_grad",
         "d_grad": "d.requires_grad", "strategy": "strategy", "reduction": "reduction", "scale": "scale",
         "bias_given": "bias (None on some ranks only)", "bias": "bias"}


def _code(table: tuple[object, ...], value: object) -> int:
    return table.index(value) if value in table else -1


def _value(x: object, device: torch.device | str) -> Tensor:
    """A scale or bias as a float64 0-dim tensor on `device`, read on the host only with the table."""
    if isinstance(x, torch.Tensor) and x.dim() == 0 and x.is_floating_point():
        return x.detach().to(device, torch.float64)
    value = float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else 0.0
    return torch.full((), value, dtype=torch.float64, device=device)


def _handshake(q: Tensor, d: Tensor, error: ValueError | None, want: tuple[bool, ...], strategy: str,
               reduction: str, scale: Scalar, bias: Scalar | None, group: Any) -> tuple[list[int], list[int]]:
    """All-gathers each rank's sizes and call settings (one float64 row per rank; the integers in it
    are exact); raises on every rank if any rank failed or the ranks disagree."""
    shape_ok = isinstance(q, torch.Tensor) and isinstance(d, torch.Tensor) and q.dim() == 2 and d.dim() == 2
    mine = [error is None, q.shape[0] if shape_ok else 0, d.shape[0] if shape_ok else 0,
            q.shape[1] if shape_ok else 0, _code(DTYPES, getattr(q, "dtype", None)), any(want), want[1],
            _code(STRATEGIES, strategy), _code(REDUCTIONS, reduction)]
    device = q.device if isinstance(q, torch.Tensor) else "cpu"
    local = torch.cat([torch.tensor([float(v) for v in mine], dtype=torch.float64).to(device),
                       torch.stack([_value(scale, device), _value(float(bias is not None), device),
                                    _value(0.0 if bias is None else bias, device)])])
    rows = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, local, group=group)
    table = torch.stack(rows).tolist()
    if error is not None:
        raise error
    failed = [r for r, row in enumerate(table) if not row[0]]
    if failed:
        raise ValueError(f"prcl.distributed: rank(s) {failed} of the process group rejected their inputs "
                         "(their own ValueError says why); no documents were exchanged")
    for field in _AGREE:
        k = _FIELDS.index(field)
        if len({row[k] for row in table}) > 1:
            raise ValueError(f"prcl.distributed: ranks disagree on {_WHAT[field]} "
                             f"({field} per rank: {[row[k] for row in table]}); every rank must make the same call")
    return [int(row[1]) for row in table], [int(row[2]) for row in table]


@dataclass
class _Plan:
    group: Any
    rank: int
    world: int
    b_sizes: list[int]
    n_sizes: list[int]
    labels: Tensor
    label_index: Tensor | None
    backend: str
    per_row: bool
    want: tuple[bool, ...] = (False,) * 4  # which of q, d, scale, bias get a gradient
    threshold: Tensor | None = None  # the false-negative mask's per-query thresholds (prcl.core.loss), or None
    masked: list[Tensor] | None = None  # the ring's per-chunk counts of masked pairs, when asked

    @property
    def offset(self) -> int:
        return sum(self.n_sizes[: self.rank])

    def peer(self, group_rank: int) -> int:
        group_rank %= self.world
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)


def _local_error(check: Callable[[], None]) -> ValueError | None:
    """This rank's input error, or None: the handshake tells every rank about it, so all fail together."""
    try:
        check()
    except ValueError as e:
        return e
    return None


def distributed_pair_bce(q: Tensor, d: Tensor, labels: Tensor | None = None, *,
                         label_index: Tensor | None = None, scale: Scalar = DEFAULT_SCALE,
                         bias: Scalar | None = None, reduction: str = "mean", backend: str | None = None,
                         process_group: object = None, strategy: str | None = None,
                         false_negative_margin: float | None = None, return_masked: bool = False) -> LossOutput:
    """Rank r's share of the global-batch loss; the values on the ranks sum to the one-process loss.

    Same arguments as `prcl.fused_pair_bce` with local tensors; `process_group` is a torch.distributed
    group, `None` for the default group, or `Ring(group)` / `Gather(group)`; `strategy` is "gather"
    (default) or "ring". Semantics, DDP/FSDP scaling and strategies: see the module docstring.
    `prcl.fused_pair_bce(..., process_group=pg)` calls this.

    Args:
        q, d: this rank's queries (B_r, D) and documents (N_r, D); local sizes may differ between ranks.
        labels, label_index: this rank's labels, as for prcl.fused_pair_bce, indexing local documents;
            dense (B_r, N_r) labels cover the local documents, every other rank's are negatives.
        scale, bias: as for prcl.fused_pair_bce; bias=None is −log(N − 1) with the global N. Every
            rank must pass the same values.
        reduction, backend: as for prcl.fused_pair_bce; "mean" divides by the global B, "none" gives this
            rank's (B_r,) rows.
        process_group, strategy: see above (Ring/Gather carry the strategy).
        false_negative_margin, return_masked: as for prcl.fused_pair_bce, for this rank's queries.

    Returns:
        This rank's share of the loss (float32): the shares of all ranks sum to the one-process loss
        on the concatenated batch; with return_masked=True, (loss, masked). Every rank must call
        backward; each then holds the exact global-loss gradient of its own q and d.

    Raises:
        ValueError: on every rank, when any rank's inputs fail the checks (naming that rank), the ranks
            disagree on a setting (naming it and each value) or torch.distributed is not initialised.

    Example (one rank here; under torchrun every rank runs the same lines on its own slice, see
    examples/distributed_loss.py):

        >>> import tempfile, torch, torch.distributed as dist, prcl
        >>> from prcl.distributed import Ring, distributed_pair_bce, ddp_loss_scale
        >>> dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/store", rank=0, world_size=1)
        >>> g = torch.Generator().manual_seed(0)
        >>> q, d = torch.randn(4, 8, generator=g), torch.randn(6, 8, generator=g)
        >>> one_process = prcl.fused_pair_bce(q, d)
        >>> torch.allclose(distributed_pair_bce(q, d), one_process)                    # gather
        True
        >>> torch.allclose(prcl.fused_pair_bce(q, d, process_group=Ring()), one_process)  # ring
        True
        >>> ddp_loss_scale()
        1.0
        >>> dist.destroy_process_group()
    """
    group, strategy = _unwrap(process_group, strategy)
    if not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialised (call init_process_group first)")
    def check() -> None:
        check_inputs(q, d, labels, label_index, scale, bias, reduction, backend)
        check_margin(false_negative_margin, return_masked)

    error = _local_error(check)
    want = tuple(torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad
                 for x in (q, d, scale, bias))
    b_sizes, n_sizes = _handshake(q, d, error, want, strategy, reduction, scale, bias, group)
    backend = resolve_backend(backend, q.device)
    # labels=None/(B_r,) become one listed pair per query, (i, off_r + i), before either strategy
    labels, label_index = kernel_labels(labels, label_index, q.shape[0], q.device)
    plan = _Plan(group, dist.get_rank(group), dist.get_world_size(group), b_sizes, n_sizes, labels,
                 label_index, backend, reduction == "none", want)
    if bias is None:
        bias = default_bias(sum(n_sizes))
    if strategy == "gather":
        d_all = gather_rows(d, plan.n_sizes, group)
        y, index = offset_labels(plan.labels, plan.label_index, plan.offset, sum(n_sizes))
        # the global mean's 1/B inside the op: the query gradients are rounded once, with it applied
        return loss.pair_bce(q, d_all, y, index, scale, bias, reduction, backend, n_queries=sum(b_sizes),
                             margin=false_negative_margin, return_masked=return_masked)
    t, b = loss.scalar(scale, q.device), loss.scalar(bias, q.device)
    plan.threshold = loss.false_negative_threshold(q, d, labels, label_index, false_negative_margin)
    plan.masked = [] if return_masked else None
    out = _RingLoss.apply(q, d, t, b, plan)
    masked, plan.masked = plan.masked or [], None  # counted on the forward trip, not again in a backward one
    out = out / sum(b_sizes) if reduction == "mean" else out
    return (out, torch.stack(masked).sum()) if return_masked else out


# --- strategy "gather" -----------------------------------------------------------------------------

def gather_rows(x: Tensor, sizes: Sequence[int], group: object = None) -> Tensor:
    """cat_r x_r over the ranks of `group`, where rank r holds sizes[r] rows (all ranks pass the same sizes):
    each rank's rows padded to the largest count, all-gathered, the padding dropped. Differentiable in x:
    ∂L/∂x_r = Σ_s (∂L_s/∂x_all)[rows of r], a reduce-scatter of the ranks' gradients (in float32)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _GatherRows.apply(x, sizes, group)
    return _gather_rows(x, sizes, group)


def _gather_rows(x: Tensor, sizes: Sequence[int], group: object) -> Tensor:
    n_max, D = max(sizes), x.shape[1]
    x = x.detach()
    padded = x if x.shape[0] == n_max else torch.cat([x, x.new_zeros(n_max - x.shape[0], D)])
    buf = x.new_empty(len(sizes), n_max, D)
    dist.all_gather(list(buf.unbind(0)), padded.contiguous(), group=group)
    if all(n == n_max for n in sizes):
        return buf.view(-1, D)
    # padding rows are dropped here, before the loss: they get neither loss nor gradient
    return torch.cat([buf[r, :n] for r, n in enumerate(sizes)])


class _GatherRows(torch.autograd.Function):
    """x_all = cat_r x_r;  ∂L/∂x_r = Σ_s (∂L_s/∂x_all)[rows of r]: a reduce-scatter of the gradients."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: Sequence[int], group: object) -> Tensor:
        ctx.sizes, ctx.group, ctx.dtype = sizes, group, x.dtype
        return _gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        sizes = ctx.sizes
        n_max, D = max(sizes), grad.shape[1]
        # float32 on the wire: R bf16 partial gradients summed in bf16 would lose the low bits
        parts = [p if p.shape[0] == n_max else torch.cat([p, p.new_zeros(n_max - p.shape[0], D)])
                 for p in grad.float().split(sizes)]
        out = grad.new_empty(n_max, D, dtype=torch.float32)
        dist.reduce_scatter(out, [p.contiguous() for p in parts], group=ctx.group)
        return out[: sizes[dist.get_rank(ctx.group)]].to(ctx.dtype), None, None


# --- strategy "ring" -------------------------------------------------------------------------------

class _RingLoss(torch.autograd.Function):
    """Σ over the ring's chunks of the rank's loss: (B_r,) rows, or their sum for scalar reductions."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, d: Tensor, t: Tensor, b: Tensor, plan: _Plan) -> Tensor:
        want = plan.want
        ctx.plan = plan
        ctx.dtypes = q.dtype, d.dtype, t.dtype, b.dtype
        if any(want) and not plan.per_row:
            # scalar loss: compute the gradient in the same trip; backward only rescales it
            total, grads = _ring(plan, q, d, t, b, q.new_ones((), dtype=torch.float32), want)
            ctx.save_for_backward(*grads)
            ctx.precomputed = True
            return total
        ctx.save_for_backward(q, d, t, b)
        ctx.precomputed = False
        return _ring(plan, q, d, t, b, None, want)[0]

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        grads: Sequence[Tensor | None]
        if ctx.precomputed:
            grads = [None if g is None else grad_out * g for g in ctx.saved_tensors]
        else:
            q, d, t, b = ctx.saved_tensors
            grads = _ring(ctx.plan, q, d, t, b, grad_out.float().contiguous(), ctx.plan.want)[1]
        # float32 until here: rounded once to the inputs' dtypes
        return (*(None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)), None)


def _chunk_loss(plan: _Plan, q: Tensor, d_c: Tensor, own: bool, t: Tensor, b: Tensor,
                grad_out: Tensor | None) -> tuple[Any, Grads4]:
    """The loss of the local queries against one document chunk, and optionally its float32
    gradients (q, d, t, b), unrounded so that the ring sums them before the one rounding at the end.

    The rank's own chunk carries its labels (local rows); any other rank's chunk holds only
    negatives: an empty (B, 0) list of pairs."""
    labels, index = _chunk_labels(plan, q, own)
    if grad_out is None:
        reduction = "none" if plan.per_row else "sum"
        with torch.no_grad():
            return loss.pair_bce(q, d_c, labels, index, t, b, reduction, plan.backend,
                                 threshold=plan.threshold), (None,) * 4
    out, *grads = loss.pair_bce_grads(q.detach(), d_c, labels, index, t.detach(), b.detach(),
                                      grad_out if plan.per_row else None, plan.backend, plan.threshold)
    return out, tuple(grads)


def _chunk_labels(plan: _Plan, q: Tensor, own: bool) -> KernelLabels:
    return (plan.labels, plan.label_index) if own else no_pairs(q.shape[0], q.device)


def _add(acc: Any, x: Any) -> Any:
    return x if acc is None else acc.add_(x)


def _ring(plan: _Plan, q: Tensor, d: Tensor, t: Tensor, b: Tensor, grad_out: Tensor | None,
          want: tuple[bool, ...]) -> tuple[Any, Grads4]:
    """One trip of the document chunks around the ring (rank r sends to r+1, receives from r−1).

    At step k rank r holds chunk c = r − k. The next chunk is in flight while the fused kernel runs on
    this one. With gradients, chunk c's gradient accumulator follows its chunk one step behind: rank r
    adds its contribution, then sends it on; it reaches rank c after the last step. On each link the
    messages alternate d_0, acc_0, d_1, acc_1, …, acc_{R−1}, and the receives are posted in the same
    order, so backends that match messages by order (NCCL) and by tag (gloo) agree.
    Returns (loss, (dq, dd, dt, db)) with float32 gradients (None where not wanted). Adds each chunk's
    count of masked pairs to plan.masked when that is a list.
    """
    R, r, grads = plan.world, plan.rank, grad_out is not None
    nxt, prv = plan.peer(r + 1), plan.peer(r - 1)
    carry_dd = grads and want[1]
    D = d.shape[1]
    out: Any = None
    dq: Any = None
    dt: Any = None
    db: Any = None
    # Every message goes through batch_isend_irecv: NCCL matches batched and plain point-to-point
    # calls on different communicators, so mixing them would hang where gloo (matching by tag) works.
    d_cur, acc_send = d.detach().contiguous(), cast(Any, None)
    for k in range(R):
        c = (r - k) % R
        ops, acc_in, d_next = [], None, None
        if acc_send is not None:  # the accumulator finished last step follows its chunk, one hop behind
            ops.append(dist.P2POp(dist.isend, acc_send, nxt, plan.group, tag=2 * k - 1))
        if carry_dd and k > 0:
            acc_in = d.new_empty(plan.n_sizes[c], D, dtype=torch.float32)
            ops.append(dist.P2POp(dist.irecv, acc_in, prv, plan.group, tag=2 * k - 1))
        if k < R - 1:
            d_next = d.new_empty(plan.n_sizes[(c - 1) % R], D)
            ops.append(dist.P2POp(dist.isend, d_cur, nxt, plan.group, tag=2 * k))
            ops.append(dist.P2POp(dist.irecv, d_next, prv, plan.group, tag=2 * k))
        works = dist.batch_isend_irecv(ops) if ops else []
        o, (gq, gd, gt, gb) = _chunk_loss(plan, q, d_cur, k == 0, t, b, grad_out)
        if plan.masked is not None:
            plan.masked.append(loss.masked_pairs(q, d_cur, *_chunk_labels(plan, q, k == 0), plan.threshold))
        out = o if out is None else out + o
        if grads:
            dq, dt, db = (_add(sums, g) for sums, g in ((dq, gq), (dt, gt), (db, gb)))
        for w in works:
            w.wait()
        if carry_dd:
            acc_send = gd if acc_in is None else acc_in.add_(gd)
        if d_next is not None:
            d_cur = d_next
    dd = acc_send
    if carry_dd and R > 1:  # the last hop brings each rank the finished gradient of its own documents
        dd = d.new_empty(d.shape, dtype=torch.float32)
        for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, acc_send, nxt, plan.group, tag=2 * R - 1),
                                         dist.P2POp(dist.irecv, dd, prv, plan.group, tag=2 * R - 1)]):
            w.wait()
    if not grads:
        return out, (None,) * 4
    return out, tuple(g if w else None for w, g in zip(want, (dq, dd, dt, db)))
