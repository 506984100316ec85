"""prcl.testing's generators and rule, which the accuracy tests, the benchmarks and the GPU check share, and
prcl.tools.bench's "sparse" case, which is a different generator by design."""
import pytest
import torch

from prcl.testing import FLOOR, FORMS, judge, labels_with_exclusions, laid_out, pair_inputs
from prcl.tools.bench.cases import listed_labels


def test_pair_inputs_unit_rows_positives_and_late_cosine():
    q, d, _ = pair_inputs(6, 9, 40, torch.bfloat16, seed=3)
    assert q.dtype == d.dtype == torch.bfloat16 and q.shape == (6, 40) and d.shape == (9, 40)
    torch.testing.assert_close(d.float().norm(dim=1), torch.ones(9), atol=1e-2, rtol=0)
    cos = (q.float() * d[:6].float()).sum(1)
    assert cos.min() > 0.2  # positives resemble their queries
    q, d, _ = pair_inputs(6, 9, 40, cos=0.95, seed=3)
    torch.testing.assert_close((q * d[:6]).sum(1), torch.full((6,), 0.95), atol=1e-6, rtol=0)
    q2, d2, _ = pair_inputs(6, 9, 40, cos=0.95, seed=3, spread=5.0)
    torch.testing.assert_close(q2, 5 * q)
    torch.testing.assert_close(d2, 5 * d)


@pytest.mark.parametrize("form", FORMS)
def test_labels_with_exclusions_mix_in_excluded_pairs_and_pads(form):
    gen = torch.Generator().manual_seed(0)
    labels, index = labels_with_exclusions(form, 40, 50, gen)
    if form == "diagonal":
        assert labels is None and index is None
        return
    assert labels.shape == {"graded": (40,), "dense": (40, 50), "sparse": (40, 3)}[form]
    assert (labels == -1).any() and ((labels >= 0) & (labels <= 1) | (labels == -1)).all()
    assert (index is not None) == (form == "sparse")
    if index is not None:
        assert (index == -1).any() and index.max() < 50
    converged, _ = labels_with_exclusions("graded", 40, 50, torch.Generator().manual_seed(0), converged=True)
    assert set(converged.tolist()) == {1.0, -1.0}
    with pytest.raises(ValueError, match="form"):
        labels_with_exclusions("ranked", 4, 5, gen)


def test_bench_sparse_case_lists_the_positive_first_and_no_document_twice():
    B, N = 30, 45
    labels, index = listed_labels(B, N, 4, torch.Generator().manual_seed(0))
    assert torch.equal(index[:, 0], torch.arange(B)) and (labels[:, 0] == 1).all()
    assert ((labels[:, 1:] >= 0) & (labels[:, 1:] < 0.5)).all()  # nothing excluded
    assert all(len(set(row)) == 4 for row in index.tolist()) and index.min() >= 0 and index.max() < N


def test_laid_out_layouts():
    x = torch.arange(12.0).reshape(3, 4)
    for layout, contiguous in (("contiguous", True), ("sliced", False), ("transposed", False)):
        y = laid_out(x, layout)
        assert y.requires_grad and torch.equal(y, x) and y.is_contiguous() == contiguous, layout
    assert laid_out(x, "sliced").storage_offset() == 1 and laid_out(x, "transposed").stride() == (1, 3)
    with pytest.raises(ValueError, match="layout"):
        laid_out(x, "strided")


def test_judge_is_the_two_times_eager_plus_floor_rule():
    gold = [torch.tensor([1.0, 2.0], dtype=torch.float64)] * 5
    eager = [torch.tensor([1.0, 2.0 + 2e-3])] * 5  # error 1e-3 relative to max |gold|
    floor = FLOOR[torch.float32]
    within = [torch.tensor([1.0, 2.0 + 4e-3])] * 5  # 2e-3: twice eager's
    beyond = [torch.tensor([1.0, 2.0 + 4.2e-3])] * 5
    assert all(v["ok"] for v in judge(within, eager, gold, floor).values())
    verdicts = judge(beyond, eager, gold, floor)
    assert not any(v["ok"] for v in verdicts.values())
    assert verdicts["dq"]["err"] == pytest.approx(2.1e-3, rel=1e-4)
    assert verdicts["dq"]["eager_err"] == pytest.approx(1e-3, rel=1e-4)
    nan = [torch.tensor([1.0, float("nan")])] + within[1:]
    assert not judge(nan, eager, gold, floor)["loss"]["ok"] and judge(nan, eager, gold, floor)["dq"]["ok"]
