"""prcl.fused_pair_bce against the float64 oracle, per backend, label form, reduction and dtype.

Error is judged against the eager error (STYLE habit 5): gold = prcl.reference in float64 on the
same (rounded) inputs; baseline = prcl.reference in the test dtype;
    err(fused) <= 2 * err(eager) + FLOOR[dtype]      (errors relative to max |gold|)
"""
import itertools
import math

import pytest
import torch

import prcl
from prcl.reference import pair_bce

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
BACKENDS = ["torch", "triton"]
# (B, N, D): B = 1, N = B + 1, sizes that are no multiple of any tile (interpreter tiles are 16),
# D not a power of two
SHAPES = [(1, 1, 8), (1, 4, 3), (5, 6, 7), (37, 45, 19), (70, 133, 40)]
FORMS = ["diagonal", "graded", "dense", "sparse"]


def make_labels(form, B, N, gen):
    """Labels of one form with excluded pairs (label < 0) mixed in; returns (labels, label_index)."""
    if form == "diagonal":
        return None, None
    if form == "graded":
        y = torch.rand(B, generator=gen)
        y[torch.rand(B, generator=gen) < 0.2] = -1.0
        return y.to(DEVICE), None
    if form == "dense":
        y = torch.where(torch.rand(B, N, generator=gen) < 0.1, torch.rand(B, N, generator=gen), 0.0)
        y[torch.rand(B, N, generator=gen) < 0.05] = -1.0
        return y.to(DEVICE), None
    K = min(3, N)
    idx = torch.stack([torch.randperm(N, generator=gen)[:K] for _ in range(B)])
    idx[torch.rand(B, K, generator=gen) < 0.25] = -1
    y = torch.rand(B, K, generator=gen)
    y[torch.rand(B, K, generator=gen) < 0.2] = -1.0
    return y.to(DEVICE), idx.to(DEVICE)


def make_inputs(B, N, D, dtype, seed=0, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, D, generator=gen), dim=1) * spread
    d = torch.nn.functional.normalize(torch.randn(N, D, generator=gen), dim=1) * spread
    d[: min(B, N)] += 0.5 * q[: min(B, N)]  # positives resemble their queries
    return q.to(DEVICE, dtype), d.to(DEVICE, dtype), gen


def run(fn, q, d, labels, label_index, dtype, reduction, scale=7.0, bias=-3.0):
    """Loss and gradients of fn at q, d (cast to dtype), with tensor scale and bias."""
    q = q.detach().to(dtype).requires_grad_()
    d = d.detach().to(dtype).requires_grad_()
    t = torch.tensor(scale, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=DEVICE,
                     requires_grad=True)
    b = torch.tensor(bias, dtype=t.dtype, device=DEVICE, requires_grad=True)
    lab = None if labels is None else labels.to(torch.float64 if dtype == torch.float64 else torch.float32)
    loss = fn(q, d, lab, label_index=label_index, scale=t, bias=b, reduction=reduction)
    weights = torch.linspace(0.5, 1.5, loss.numel(), device=DEVICE, dtype=loss.dtype).reshape(loss.shape)
    grads = torch.autograd.grad((loss * weights).sum(), (q, d, t, b))
    return [loss.detach()] + list(grads)


def rel_err(x, gold):
    # the 0.1 floor on the scale keeps cases whose gold is exactly 0 (every pair excluded) meaningful;
    # the quantities compared here are O(0.1–10) otherwise
    return ((x.double() - gold).abs().max() / gold.abs().max().clamp(min=0.1)).item()


def check_against_oracle(fused_fn, q, d, labels, label_index, dtype, reduction):
    gold = run(pair_bce, q, d, labels, label_index, torch.float64, reduction)
    eager = run(pair_bce, q, d, labels, label_index, dtype, reduction)
    fused = run(fused_fn, q, d, labels, label_index, dtype, reduction)
    assert fused[0].dtype == torch.float32
    for name, f, e, g, x in zip(["loss", "dq", "dd", "dscale", "dbias"], fused, eager, gold, [None, q, d, None, None]):
        if x is not None:
            assert f.dtype == dtype, f"{name} came back as {f.dtype}"
        assert torch.isfinite(f).all(), name
        assert rel_err(f, g) <= 2 * rel_err(e, g) + FLOOR[dtype], (
            f"{name}: fused err {rel_err(f, g):.3g} vs eager err {rel_err(e, g):.3g}")


def _ids(v):
    return "B{}-N{}-D{}".format(*v) if isinstance(v, tuple) else str(v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_matches_oracle(shape, form, reduction, dtype, backend):
    B, N, D = shape
    dtype = DTYPES[dtype]
    q, d, gen = make_inputs(B, N, D, dtype, seed=B * 1000 + N)
    labels, label_index = make_labels(form, B, N, gen)

    def fused(*args, **kw):
        return prcl.fused_pair_bce(*args, backend=backend, **kw)

    check_against_oracle(fused, q, d, labels, label_index, dtype, reduction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(24, 40, generator=gen).to(DEVICE).T  # (40, 24), column-major
    d = torch.randn(50, 48, generator=gen).to(DEVICE)[:, ::2]  # (50, 24), strided rows
    assert not q.is_contiguous() and not d.is_contiguous()
    labels, label_index = make_labels("sparse", 40, 50, gen)
    for dtype in (torch.float32, torch.bfloat16):
        check_against_oracle(lambda *a, **k: prcl.fused_pair_bce(*a, backend=backend, **k),
                             q.to(dtype), d.to(dtype), labels, label_index, dtype, "mean")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wanted", [c for r in range(5) for c in itertools.combinations("qdtb", r)],
                         ids=lambda c: "grad-" + ("".join(c) or "none"))
def test_exactly_the_inputs_requiring_grad_get_one(wanted, backend):
    q, d, _ = make_inputs(9, 11, 6, torch.float32)
    t = torch.tensor(5.0, device=DEVICE)
    b = torch.tensor(-2.0, device=DEVICE)
    inputs = dict(q=q, d=d, t=t, b=b)
    for name in wanted:
        inputs[name].requires_grad_()
    loss = prcl.fused_pair_bce(inputs["q"], inputs["d"], scale=inputs["t"], bias=inputs["b"], backend=backend)
    assert loss.requires_grad == bool(wanted)
    if wanted:
        loss.backward()
    for name, x in inputs.items():
        assert (x.grad is not None) == (name in wanted), name
        if x.grad is not None:
            assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
def test_extreme_logits_are_finite(backend, dtype):
    # |z| reaches ~ scale * spread² = 10 * 25 = 250: softplus and σ must not overflow
    dtype = DTYPES[dtype]
    q, d, gen = make_inputs(20, 30, 16, dtype, spread=5.0)
    labels, label_index = make_labels("sparse", 20, 30, gen)
    z = 10.0 * q.float() @ d.float().T
    assert z.abs().max() > 100
    check_against_oracle(lambda *a, **k: prcl.fused_pair_bce(*a, backend=backend, **k),
                         q, d, labels, label_index, dtype, "mean")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
def test_many_panels(form, backend, monkeypatch):
    # Panels of ~300 elements (and dense-exclusion chunks of 2 rows) make these shapes cross many
    # panels, ragged last ones included: per-panel accumulation and workspace reuse are checked.
    from prcl import functional, torch_impl, triton_impl

    monkeypatch.setattr(torch_impl, "PANEL_ELEMS", 300)
    monkeypatch.setattr(triton_impl, "PANEL_ELEMS", 300)
    monkeypatch.setattr(functional, "EXCLUSION_CHUNK", 2 * 45)
    q, d, gen = make_inputs(37, 45, 19, torch.float32)
    labels, label_index = make_labels(form, 37, 45, gen)
    for reduction in ("mean", "none"):
        check_against_oracle(lambda *a, **k: prcl.fused_pair_bce(*a, backend=backend, **k),
                             q, d, labels, label_index, torch.float32, reduction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_of_minus_infinity_exclude_without_nan(backend):
    q, d, _ = make_inputs(4, 6, 8, torch.float32)
    q.requires_grad_()
    labels = torch.tensor([1.0, -float("inf"), 0.5, 1.0], device=DEVICE)
    loss = prcl.fused_pair_bce(q, d, labels, backend=backend)
    loss.backward()
    finite = prcl.fused_pair_bce(q.detach(), d, torch.tensor([1.0, -1.0, 0.5, 1.0], device=DEVICE), backend=backend)
    assert torch.isfinite(q.grad).all()
    assert loss.item() == pytest.approx(finite.item(), rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_scale_and_bias(backend):
    q, d, _ = make_inputs(6, 10, 8, torch.float32)
    fused = prcl.fused_pair_bce(q, d, backend=backend)
    explicit = pair_bce(q.double(), d.double(), scale=10.0, bias=-math.log(10 - 1))
    assert prcl.default_bias(10) == pytest.approx(-math.log(9))
    assert prcl.default_bias(1) == 0.0
    assert fused.item() == pytest.approx(explicit.item(), rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    q, d, gen = make_inputs(40, 70, 24, torch.float32)
    labels, label_index = make_labels("sparse", 40, 70, gen)
    results = [run(lambda *a, **k: prcl.fused_pair_bce(*a, backend=backend, **k), q, d, labels, label_index,
                   torch.float32, "mean") for _ in range(2)]
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_auto_backend_matches_reference():
    q, d, _ = make_inputs(12, 20, 8, torch.float32)
    auto = prcl.fused_pair_bce(q, d)
    ref = prcl.fused_pair_bce(q, d, backend="reference")
    assert auto.item() == pytest.approx(ref.item(), rel=1e-5)


def test_gradcheck_float64_ops():
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(7, 5, generator=gen, dtype=torch.float64), torch.randn(9, 5, generator=gen, dtype=torch.float64),
            torch.tensor(2.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)]
    args = [a.requires_grad_() for a in args]
    assert torch.autograd.gradcheck(lambda *a: torch.ops.prcl.pair_softplus_rows(*a, "torch"), args)
    assert torch.autograd.gradcheck(lambda *a: torch.ops.prcl.pair_softplus_total(*a, "torch")[0], args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    q, d, _ = make_inputs(10, 13, 16, torch.float32)
    args = (q.requires_grad_(), d.requires_grad_(), torch.tensor(4.0, device=DEVICE, requires_grad=True),
            torch.tensor(-1.0, device=DEVICE, requires_grad=True), backend)
    torch.library.opcheck(torch.ops.prcl.pair_softplus_rows.default, args)
    torch.library.opcheck(torch.ops.prcl.pair_softplus_total.default, args)
    # the backward op has no double-backward formula: check it on inputs that do not require grad
    plain = tuple(a.detach() for a in args[:4]) + (torch.rand(10, device=DEVICE), backend)
    torch.library.opcheck(torch.ops.prcl.pair_softplus_rows_backward.default, plain)


def test_compiled_training_step_matches_eager():
    torch._dynamo.reset()
    q0, d0, gen = make_inputs(16, 24, 12, torch.float32)
    labels, label_index = make_labels("sparse", 16, 24, gen)
    proj = torch.nn.Linear(12, 12, device=DEVICE)

    def loss_fn(q, d, t):
        return prcl.fused_pair_bce(proj(q), proj(d), labels, label_index=label_index, scale=t, backend="torch")

    results = []
    # fullgraph: any graph break raises; the backward runs through AOTAutograd's compiled graph
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
        proj.zero_grad()
        t = torch.tensor(5.0, device=DEVICE, requires_grad=True)
        loss = fn(q0, d0, t)
        loss.backward()
        results.append([loss.detach(), proj.weight.grad.clone(), t.grad.clone()])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
