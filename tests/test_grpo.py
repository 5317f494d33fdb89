"""Each GRPO term against hand-computed values."""
import math

import pytest
import torch

from mmupt.services.learner.grpo import (LossConfig, aggregate, clipped_pg_loss, group_advantages, grpo_loss, k3_kl,
                                         token_logprobs, truncated_is_weight, zero_advantage)


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


def test_clipped_and_dual_clipped_tokens_get_no_gradient():
    ratio = torch.tensor([1.5, 1.0, 0.5, 5.0])
    logp = ratio.log().requires_grad_(True)
    loss, _ = clipped_pg_loss(logp, torch.zeros(4), torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.2, 0.3, 3.0)
    loss.sum().backward()
    # d(-A r)/d logp = -A r where the ratio is not clipped; 0 above 1 + clip_high for A > 0.
    assert logp.grad.tolist() == pytest.approx([0.0, -1.0, -0.5, 0.0])
    logp.grad = None
    loss, stats = clipped_pg_loss(logp, torch.zeros(4), -torch.ones(4), 0.2, 0.3, 3.0)
    loss.sum().backward()
    # A < 0: clipped below 1 - clip_low (0.5 -> 0.8), dual-clipped at 3 (ratio 5): no gradient there.
    assert loss.tolist() == pytest.approx([1.5, 1.0, 0.8, 3.0])
    assert logp.grad.tolist() == pytest.approx([1.5, 1.0, 0.0, 0.0])
    assert stats["dual_clipped"].tolist() == [0, 0, 0, 1]


def test_decoupled_loss_takes_ratio_against_proximal_and_caps_the_behaviour_weight():
    logp = torch.tensor([[math.log(1.2)]], requires_grad=True)
    proximal = torch.zeros(1, 1)                    # pi_prox = 1 (relative)
    behaviour = torch.tensor([[math.log(0.25)]])    # sampled by an older policy: pi_prox / pi_b = 4 > cap 2
    loss, m = grpo_loss(logp, proximal, behaviour, None, torch.tensor([1.0]), torch.ones(1, 1),
                        LossConfig(kl_coef=0.0, tis_cap=2.0))
    assert loss.item() == pytest.approx(-2.0 * 1.2)  # weight 2 (capped) x -A x ratio 1.2 (inside the clip)
    assert m["is_weight_mean"] == pytest.approx(2.0) and m["is_truncated_frac"] == 1.0
    assert m["mismatch_kl"] == pytest.approx(math.log(0.25))


def test_kl_term_and_sequence_mean_aggregation():
    logp = torch.tensor([[-1.0, -1.0, 0.0], [-2.0, 0.0, 0.0]])
    ref = torch.tensor([[-2.0, -1.0, 0.0], [-2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    zero = torch.zeros(2)  # no advantage: only the KL term acts
    loss, m = grpo_loss(logp, logp, logp, ref, zero, mask, LossConfig(kl_coef=0.5, aggregation="seq_mean"))
    k3 = math.exp(-1) + 1 - 1  # first token of the first sequence; the others are 0
    assert m["kl"] == pytest.approx((k3 / 2 + 0.0) / 2)
    assert loss.item() == pytest.approx(0.5 * (k3 / 2) / 2)


def test_zero_advantage_groups_are_recognised():
    assert zero_advantage([1.0, 1.0, 1.0]) and zero_advantage([0.0, 0.0])
    assert not zero_advantage([1.0, 0.0, 1.0])
