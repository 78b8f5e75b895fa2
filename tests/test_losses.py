"""Losses by value on small hand-computed examples."""
import math

import pytest
import torch
import torch.nn.functional as F

from fattag.losses import LSEP, FocalBCE, SoftBootstrap, make_loss


def test_lsep_by_hand():
    s = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, -1.0]])
    y = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    first = math.log(1 + math.exp(0 - 2) + math.exp(1 - 2))
    second = math.log(1 + math.exp(-1 - 0) + math.exp(-1 - 3))
    assert LSEP()(s, y).item() == pytest.approx((first + second) / 2, rel=1e-6)


def test_lsep_is_zero_without_pairs_and_depends_only_on_order_gaps():
    s = torch.tensor([[5.0, -1.0]])
    assert LSEP()(s, torch.tensor([[1.0, 1.0]])).item() == pytest.approx(0.0)
    assert LSEP()(s, torch.tensor([[0.0, 0.0]])).item() == pytest.approx(0.0)
    y = torch.tensor([[1.0, 0.0]])
    assert LSEP()(s, y).item() == pytest.approx(LSEP()(s + 7, y).item())  # shift-invariant: a ranking loss
    assert LSEP()(torch.tensor([[-1.0, 5.0]]), y).item() > LSEP()(s, y).item()  # wrong order costs more


def test_focal_with_gamma_zero_is_bce_and_down_weights_easy_labels():
    logits, y = torch.randn(4, 6), (torch.rand(4, 6) > 0.5).float()
    assert FocalBCE(0.0)(logits, y).item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, y).item())
    easy, hard = torch.tensor([[4.0]]), torch.tensor([[-1.0]])
    one = torch.ones(1, 1)
    ratio_focal = FocalBCE(2.0)(easy, one) / FocalBCE(2.0)(hard, one)
    ratio_bce = FocalBCE(0.0)(easy, one) / FocalBCE(0.0)(hard, one)
    assert ratio_focal < ratio_bce / 10


def test_soft_bootstrap_targets_and_gradient():
    logits = torch.tensor([[2.0, -1.0, 0.5]], requires_grad=True)
    y = torch.tensor([[0.0, 1.0, 1.0]])
    loss = SoftBootstrap(0.7)(logits, y)
    p = torch.sigmoid(logits.detach())
    target = 0.7 * y + 0.3 * p
    assert loss.item() == pytest.approx(F.binary_cross_entropy_with_logits(logits.detach(), target).item())
    loss.backward()
    expected = (p - target) / 3  # the model's own prediction is a fixed target: no gradient flows through it
    assert torch.allclose(logits.grad, expected, atol=1e-6)
    assert SoftBootstrap(1.0)(logits, y).item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, y).item())


def test_make_loss_names():
    for name in ("bce", "focal", "lsep", "lsoft"):
        assert make_loss(name)(torch.zeros(2, 3), torch.tensor([[1.0, 0, 0], [0, 1.0, 1.0]])).item() > 0
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("hinge")
