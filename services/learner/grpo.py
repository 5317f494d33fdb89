"""GRPO as run upstream (EasyR1/verl), each term a small pure function.

Shapes: per-token tensors are [N, T] with a float `mask` of the same shape (1 on response tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean) / (std + eps) within one group, unbiased std. A group of one has zero advantage."""
    rewards = rewards.float()
    if rewards.numel() < 2:
        return torch.zeros_like(rewards)
    return (rewards - rewards.mean()) / (rewards.std(unbiased=True) + eps)


def zero_advantage(rewards) -> bool:
    """Every response got the same reward: the group has no policy-gradient signal (only KL acts)."""
    return max(rewards) == min(rewards)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature): log-probs at the sampling temperature."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def clipped_pg_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                    clip_low: float, clip_high: float, dual_clip: float) -> tuple[torch.Tensor, dict]:
    """Per-token PPO loss with asymmetric clip [1-clip_low, 1+clip_high] and dual clip for A < 0.

    Returns the per-token loss and per-token indicator tensors for clip statistics.
    """
    ratio = torch.exp(logp - logp_old)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    # Dual clip: for negative advantages bound the loss at -A * dual_clip (a huge ratio cannot blow up).
    loss_dual = -advantages * dual_clip
    dual_active = (advantages < 0) & (loss > loss_dual)
    loss = torch.where(advantages < 0, torch.minimum(loss, loss_dual), loss)
    stats = {"clipped": (loss_clipped > loss_unclipped).float(), "dual_clipped": dual_active.float(), "ratio": ratio}
    return loss, stats


def k3_kl(logp: torch.Tensor, logp_ref: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """The "low_var_kl" (k3) estimator of KL(pi || pi_ref) per token, clamped to [-clamp, clamp]."""
    log_ratio = logp_ref - logp
    kl = torch.exp(log_ratio) - log_ratio - 1.0
    return torch.clamp(kl, -clamp, clamp)


def truncated_is_weight(logp_proximal: torch.Tensor, logp_behaviour: torch.Tensor, cap: float) -> torch.Tensor:
    """min(pi_prox / pi_behaviour, cap) per token, detached: corrects for stale or mismatched sampling."""
    return torch.clamp(torch.exp(logp_proximal - logp_behaviour), max=cap).detach()


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean") -> torch.Tensor:
    """token_mean: mean over every response token; seq_mean: mean per sequence, then over sequences."""
    if mode == "token_mean":
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    if mode == "seq_mean":
        per_seq = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_seq.mean()
    raise ValueError(f"unknown aggregation {mode!r}")


@dataclass(frozen=True)
class LossConfig:
    clip_low: float = 0.2
    clip_high: float = 0.3
    dual_clip: float = 3.0
    kl_coef: float = 0.01
    kl_clamp: float = 10.0
    tis_cap: float = 2.0
    aggregation: str = "token_mean"


def grpo_loss(logp: torch.Tensor, logp_proximal: torch.Tensor, logp_behaviour: torch.Tensor,
              logp_ref: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor,
              cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The full objective: truncated-IS-weighted clipped policy gradient + k3 KL to the reference.

    `logp_proximal` is the learner's policy before this update (detached); the PPO ratio is taken
    against it, and the truncated importance weight pi_prox / pi_behaviour corrects for groups
    sampled at an older version (decoupled PPO). With fresh on-policy groups the weight is ~1 and
    this is the upstream objective.
    """
    if advantages.dim() == 1:  # one advantage per sequence, broadcast to its tokens
        advantages = advantages.unsqueeze(-1)
    pg, stats = clipped_pg_loss(logp, logp_proximal, advantages, cfg.clip_low, cfg.clip_high, cfg.dual_clip)
    weight = truncated_is_weight(logp_proximal, logp_behaviour, cfg.tis_cap)
    per_token = weight * pg
    metrics = {}
    if logp_ref is not None and cfg.kl_coef > 0:
        kl = k3_kl(logp, logp_ref, cfg.kl_clamp)
        per_token = per_token + cfg.kl_coef * kl
        metrics["kl"] = aggregate(kl.detach(), mask, cfg.aggregation).item()
    loss = aggregate(per_token, mask, cfg.aggregation)
    with torch.no_grad():
        metrics.update({
            "pg_loss": aggregate((weight * pg).detach(), mask, cfg.aggregation).item(),
            "clip_frac": aggregate(stats["clipped"], mask).item(),
            "dual_clip_frac": aggregate(stats["dual_clipped"], mask).item(),
            "is_weight_mean": aggregate(weight, mask).item(),
            "is_truncated_frac": aggregate((torch.exp(logp_proximal - logp_behaviour) > cfg.tis_cap).float(), mask).item(),
            # k1 estimate of KL(behaviour || learner) over sampled tokens: rollout/learner mismatch.
            "mismatch_kl": aggregate((logp_behaviour - logp_proximal).detach(), mask).item(),
        })
    return loss, metrics
