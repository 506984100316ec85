"""prcl.nn.PairBCELoss: the module equals fused_pair_bce at its scale and bias, and learns them."""
import math

import pytest
import torch

import prcl
from prcl.nn import PairBCELoss


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 8, generator=g), torch.randn(9, 8, generator=g)


def test_fixed_scale_and_bias_equal_the_function():
    q, d = _inputs()
    assert PairBCELoss(7.0)(q, d).item() == prcl.fused_pair_bce(q, d, scale=7.0).item()
    assert PairBCELoss(7.0, -2.0)(q, d).item() == prcl.fused_pair_bce(q, d, scale=7.0, bias=-2.0).item()
    assert list(PairBCELoss().parameters()) == []


def test_learnable_bias_is_an_offset_on_the_prior():
    q, d = _inputs()
    loss_fn = PairBCELoss(5.0, learnable_scale=True, learnable_bias=True)
    assert {n for n, _ in loss_fn.named_parameters()} == {"logit_scale", "logit_bias"}
    assert loss_fn.logit_scale.item() == pytest.approx(math.log(5.0))
    t, b = loss_fn.scale_and_bias(9)
    assert t.item() == pytest.approx(5.0) and b.item() == pytest.approx(-math.log(8))
    loss = loss_fn(q, d)
    assert loss.item() == pytest.approx(prcl.fused_pair_bce(q, d, scale=5.0).item(), rel=1e-6)
    loss.backward()
    assert loss_fn.logit_scale.grad is not None and loss_fn.logit_bias.grad is not None
    # d loss / d log t = t · d loss / d t
    t_ref = torch.tensor(5.0, requires_grad=True)
    b_ref = torch.tensor(-math.log(8), requires_grad=True)
    prcl.fused_pair_bce(q, d, scale=t_ref, bias=b_ref).backward()
    assert loss_fn.logit_scale.grad.item() == pytest.approx(5.0 * t_ref.grad.item(), rel=1e-5)
    assert loss_fn.logit_bias.grad.item() == pytest.approx(b_ref.grad.item(), rel=1e-5)


def test_a_fixed_bias_is_learned_from_its_value():
    loss_fn = PairBCELoss(bias=-3.0, learnable_bias=True)
    assert loss_fn.scale_and_bias(100)[1].item() == pytest.approx(-3.0)


@pytest.mark.parametrize("kw, message", [(dict(scale=0.0), "scale: expected a finite float > 0"),
                                         (dict(scale=True), "scale"), (dict(bias=float("inf")), "bias: expected None")])
def test_bad_settings_raise(kw, message):
    with pytest.raises(ValueError, match=message):
        PairBCELoss(**kw)
