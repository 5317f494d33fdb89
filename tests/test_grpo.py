"""Each GRPO term against hand-computed values."""
import math

import pytest
import torch

from mmupt.services.learner.grpo import (LossConfig, aggregate, clipped_pg_loss, group_advantages, grpo_loss, k3_kl,
                                         token_logprobs, truncated_is_weight)


def test_group_advantage_uses_unbiased_std():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    std = math.sqrt(((0.5 ** 2) * 4) / 3)  # unbiased
    a = 0.5 / (std + 1e-6)
    assert adv.tolist() == pytest.approx([a, -a, -a, a])


def test_unanimous_group_and_group_of_one_have_zero_advantage():
    assert group_advantages(torch.ones(5)).abs().max() < 1e-6
    assert group_advantages(torch.tensor([1.0])).tolist() == [0.0]


def test_ratio_clipped_asymmetrically():
    logp_old = torch.zeros(4)
    ratio = torch.tensor([0.5, 0.9, 1.2, 1.5])
    logp = ratio.log()
    loss_pos, stats = clipped_pg_loss(logp, logp_old, torch.ones(4), 0.2, 0.3, 3.0)
    # A>0: loss = -min(r, clip(r)) -> clip only binds above 1.3
    assert loss_pos.tolist() == pytest.approx([-0.5, -0.9, -1.2, -1.3])
    assert stats["clipped"].tolist() == [0, 0, 0, 1]
    loss_neg, _ = clipped_pg_loss(logp, logp_old, -torch.ones(4), 0.2, 0.3, 3.0)
    # A<0: loss = max(r, clip(r)) -> clip binds below 0.8
    assert loss_neg.tolist() == pytest.approx([0.8, 0.9, 1.2, 1.5])


def test_dual_clip_bounds_negative_advantages():
    logp = torch.tensor([math.log(10.0), math.log(2.0)])
    loss, stats = clipped_pg_loss(logp, torch.zeros(2), torch.tensor([-2.0, -2.0]), 0.2, 0.3, 3.0)
    assert loss.tolist() == pytest.approx([6.0, 4.0])  # ratio 10 capped at 3 * |A|; ratio 2 untouched
    assert stats["dual_clipped"].tolist() == [1, 0]
    pos, _ = clipped_pg_loss(logp, torch.zeros(2), torch.tensor([2.0, 2.0]), 0.2, 0.3, 3.0)
    assert pos.tolist() == pytest.approx([-2.6, -2.6])  # no dual clip for A > 0


def test_k3_kl_values_and_clamp():
    logp = torch.tensor([0.0, -1.0, -30.0])
    ref = torch.tensor([0.0, -2.0, 0.0])
    kl = k3_kl(logp, ref, clamp=10.0)
    assert kl[0].item() == pytest.approx(0.0)
    assert kl[1].item() == pytest.approx(math.exp(-1) + 1 - 1)
    assert kl[2].item() == pytest.approx(10.0)  # exp(30) clamped


def test_token_logprobs_at_temperature():
    logits = torch.tensor([[[2.0, 0.0]]])
    lp = token_logprobs(logits, torch.tensor([[0]]), temperature=2.0)
    assert lp.item() == pytest.approx(1.0 - math.log(math.e + 1.0))


def test_truncated_is_weight():
    w = truncated_is_weight(torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.0, -math.log(4), math.log(2)]), cap=2.0)
    assert w.tolist() == pytest.approx([1.0, 2.0, 0.5])


def test_aggregation_modes():
    values = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert aggregate(values, mask, "token_mean").item() == pytest.approx(2.0)
    assert aggregate(values, mask, "seq_mean").item() == pytest.approx(2.0)
    values2 = torch.tensor([[1.0, 3.0, 0.0], [4.0, 0.0, 0.0]])
    assert aggregate(values2, mask, "token_mean").item() == pytest.approx(8 / 3)
    assert aggregate(values2, mask, "seq_mean").item() == pytest.approx(3.0)


def test_full_loss_on_policy_reduces_to_policy_gradient():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    mask = torch.ones(2, 2)
    adv = torch.tensor([1.0, -1.0])
    loss, m = grpo_loss(logp, logp.detach(), logp.detach(), None, adv, mask, LossConfig(kl_coef=0.0))
    assert loss.item() == pytest.approx(0.0)  # ratio 1: -A summed over +1/-1 cancels
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-0.25, -0.25, 0.25, 0.25])
    assert m["is_weight_mean"] == pytest.approx(1.0) and m["clip_frac"] == 0.0
