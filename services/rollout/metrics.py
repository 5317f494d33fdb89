"""Prometheus metrics of the rollout server."""
from prometheus_client import Counter, Gauge, Histogram

VERSION = Gauge("mmupt_rollout_policy_version", "Policy version being served")
GROUPS = Counter("mmupt_rollout_groups_total", "Groups sampled for training")
TOKENS = Counter("mmupt_rollout_generated_tokens_total", "Tokens generated")
GROUP_SECONDS = Histogram("mmupt_rollout_group_seconds", "Time to sample one group",
                          buckets=[0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300])
DEADLETTERED = Counter("mmupt_rollout_deadlettered_total", "Prompt entries sent to the dead-letter stream")
WAITING_FOR_WEIGHTS = Gauge("mmupt_rollout_waiting_for_weights", "1 while too stale to take training prompts")
WEIGHT_PUSHES = Counter("mmupt_rollout_weight_pushes_total", "Weight pushes received, by outcome", ["outcome"])
SWAP_SECONDS = Histogram("mmupt_rollout_weight_swap_seconds", "Time to swap staged weights in",
                         buckets=[0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30])
WEIGHT_TRANSFER_ACTIVE = Gauge("mmupt_rollout_weight_transfer_active", "1 while a pushed version is being staged")
