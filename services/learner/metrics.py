"""Prometheus metrics of the learner."""
from prometheus_client import Counter, Gauge, Histogram

TIME_BUCKETS = [0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300]

STEP = Gauge("mmupt_learner_step", "Optimizer steps taken")
VERSION = Gauge("mmupt_learner_policy_version", "Policy version (the label of the weights last published)")
STEPS = Counter("mmupt_learner_steps_total", "Optimizer steps (since this process started)")
ADMITTED = Counter("mmupt_learner_prompts_admitted_total", "Prompts admitted into the prompts stream")
TRAINED = Counter("mmupt_learner_groups_trained_total", "Groups trained on (since this process started)")
DROPPED_STALE = Counter("mmupt_learner_groups_dropped_stale_total", "Groups dropped as older than max_staleness")
SKIPPED_ZERO_ADV = Counter("mmupt_learner_groups_skipped_zero_advantage_total",
                           "Groups skipped because every response got the same reward (skip_zero_advantage)")
DUPLICATES = Counter("mmupt_learner_duplicate_groups_total", "Re-delivered groups recognised and not trained twice")
DEADLETTERED = Counter("mmupt_learner_deadlettered_total", "Scored entries sent to the dead-letter stream")
IN_FLIGHT = Gauge("mmupt_learner_groups_in_flight", "Admitted groups not yet trained or dropped")
UNCOMMITTED = Gauge("mmupt_learner_groups_uncommitted", "Groups trained on since the last checkpoint")
LOSS = Gauge("mmupt_learner_loss", "Loss of the last step", ["term"])
STEP_STAT = Gauge("mmupt_learner_step_stat", "Statistics of the last step", ["stat"])
REWARD = Gauge("mmupt_learner_mean_reward", "Mean reward of the last step's groups")
TOKENS = Counter("mmupt_learner_tokens_total", "Response tokens trained on")
TOKENS_PER_S = Gauge("mmupt_learner_tokens_per_second", "Response tokens per second of the last step")
VERSION_LAG = Histogram("mmupt_learner_version_lag", "Learner version minus a group's sampling version",
                        buckets=[0, 1, 2, 3, 4, 6, 8, 16])
STEP_SECONDS = Histogram("mmupt_learner_step_seconds", "Time of one optimizer step (forward+backward)",
                         buckets=TIME_BUCKETS)
WAIT_SECONDS = Counter("mmupt_learner_wait_seconds_total", "Time spent waiting for scored groups")
EXPORT_SECONDS = Histogram("mmupt_learner_export_seconds", "Time to gather the full weights for a push or checkpoint",
                           buckets=TIME_BUCKETS)
CHECKPOINT_SECONDS = Histogram("mmupt_learner_checkpoint_seconds", "Time to write one checkpoint",
                               buckets=TIME_BUCKETS)
PUSH_SECONDS = Histogram("mmupt_weight_push_seconds", "Time to push one version to all rollout servers",
                         buckets=[0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300])
PUSH_FAILURES = Counter("mmupt_weight_push_failures_total", "Weight pushes to one server that failed after retries",
                        ["server"])
PUSH_RETRIES = Counter("mmupt_weight_push_retries_total", "Weight push attempts retried", ["server"])
PUSH_FAILED_SERVERS = Gauge("mmupt_weight_push_failed_servers", "Servers the last push did not reach")
PUSH_BYTES = Counter("mmupt_weight_push_bytes_total", "Wire bytes of versions delivered (summed over servers)")
