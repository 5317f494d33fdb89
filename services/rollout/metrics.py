"""Prometheus metrics of the rollout server (with the vLLM backend, vLLM's own `vllm:*` metrics are
served from the same /metrics endpoint: they register in the same process-wide registry)."""
from prometheus_client import Counter, Gauge, Histogram

VERSION = Gauge("mmupt_rollout_policy_version", "Policy version being served")
GROUPS = Counter("mmupt_rollout_groups_total", "Groups sampled for training")
TOKENS = Counter("mmupt_rollout_generated_tokens_total", "Tokens generated (training and API)")
PROMPT_TOKENS = Counter("mmupt_rollout_prompt_tokens_total", "Prompt tokens processed (training and API)")
TOKENS_PER_SECOND = Gauge("mmupt_rollout_tokens_per_second", "Generated tokens per second of the last backend call")
GROUP_SECONDS = Histogram("mmupt_rollout_group_seconds", "Time to sample one group",
                          buckets=[0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300])
DEADLETTERED = Counter("mmupt_rollout_deadlettered_total", "Prompt entries sent to the dead-letter stream")
WAITING_FOR_WEIGHTS = Gauge("mmupt_rollout_waiting_for_weights", "1 while too stale to take training prompts")
WEIGHT_PUSHES = Counter("mmupt_rollout_weight_pushes_total", "Weight pushes received, by outcome", ["outcome"])
SWAP_SECONDS = Histogram("mmupt_rollout_weight_swap_seconds", "Time to swap staged weights in",
                         buckets=[0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30])
WEIGHT_TRANSFER_ACTIVE = Gauge("mmupt_rollout_weight_transfer_active", "1 while a pushed version is being staged")
# HTTP API
REQUESTS = Counter("mmupt_rollout_requests_total", "API requests answered, by endpoint and status code",
                   ["endpoint", "status"])
REQUEST_SECONDS = Histogram("mmupt_rollout_request_seconds", "API request latency (queueing included)", ["endpoint"],
                            buckets=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300])
IN_FLIGHT = Gauge("mmupt_rollout_requests_in_flight", "API prompts being generated right now")
QUEUE_DEPTH = Gauge("mmupt_rollout_queue_depth", "API prompts waiting for the backend")
REJECTED = Counter("mmupt_rollout_rejected_total", "API requests refused for load, by reason", ["reason"])
EVAL_JOBS = Counter("mmupt_rollout_eval_jobs_total", "Evaluation jobs, by outcome", ["outcome"])


def initialise() -> None:
    """Export the labelled series at zero from the start, so dashboards and alerts see them early."""
    for reason in ("queue_full", "queue_timeout"):
        REJECTED.labels(reason)
    for outcome in ("finished", "failed"):
        EVAL_JOBS.labels(outcome)
