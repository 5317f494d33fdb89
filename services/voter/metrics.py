"""Prometheus metrics of the voter.

Every group metric carries `reward_mode` ("majority": label-free MM-UPT; "ground_truth": the
supervised baseline), so the two kinds of run never mix on a dashboard. Rates (groups per second)
come from `rate(mmupt_voter_groups_total[1m])`; accuracies are ratios of counters, e.g.
`rate(mmupt_voter_label_correct_total[5m]) / rate(mmupt_voter_labelled_groups_total[5m])`.
"""
from prometheus_client import Counter, Gauge, Histogram

_MODE = ["reward_mode"]
INFO = Gauge("mmupt_voter_info", "The voter's configuration (value 1)", ["reward_mode", "grader", "tie_policy"])
GROUPS = Counter("mmupt_voter_groups_total", "Groups voted", _MODE)
RESPONSES = Counter("mmupt_voter_responses_total", "Responses voted", _MODE)
NO_ANSWER = Counter("mmupt_voter_no_answer_total", "Responses without an extractable final answer", _MODE)
UNANIMOUS = Counter("mmupt_voter_unanimous_groups_total", "Groups where every response agrees (zero advantage)", _MODE)
TIED = Counter("mmupt_voter_tied_groups_total", "Groups whose top classes had equal votes", _MODE)
DROPPED = Counter("mmupt_voter_dropped_groups_total", "Groups the vote policy says not to train", ["reward_mode", "reason"])
COMPARE_TIMEOUTS = Counter("mmupt_voter_compare_timeouts_total",
                           "Symbolic comparisons that ran out of time (counted as not equal)", _MODE)
LABELLED = Counter("mmupt_voter_labelled_groups_total", "Groups that carried a hidden label (monitoring)", _MODE)
LABEL_CORRECT = Counter("mmupt_voter_label_correct_total", "Groups whose majority equals the hidden label", _MODE)
PASS_AT_N = Counter("mmupt_voter_pass_at_n_total", "Labelled groups with at least one correct response", _MODE)
LABELLED_RESPONSES = Counter("mmupt_voter_labelled_responses_total", "Responses of labelled groups", _MODE)
REWARD_AGREE = Counter("mmupt_voter_reward_agree_total",
                       "Responses whose majority reward equals the reward the hidden label gives", _MODE)
DEADLETTERED = Counter("mmupt_voter_deadlettered_total", "Group entries sent to the dead-letter stream")
_RATIO_BUCKETS = [i / 10 for i in range(1, 11)]
MAJORITY_RATIO = Histogram("mmupt_voter_majority_ratio", "Share of a group in its majority class", _MODE,
                           buckets=_RATIO_BUCKETS)
NO_ANSWER_RATE = Histogram("mmupt_voter_no_answer_rate", "Share of a group without an answer", _MODE,
                           buckets=_RATIO_BUCKETS)
VOTE_ENTROPY = Histogram("mmupt_voter_vote_entropy", "Entropy (nats) of a group's answer classes", _MODE,
                         buckets=[0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0])
LATENCY = Histogram("mmupt_voter_group_seconds", "Time to vote one group", _MODE,
                    buckets=[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5])


DROP_REASONS = ("tie", "min_agreement")


def initialise(reward_mode: str) -> None:
    """Export every series of this voter's mode at zero from the start, so dashboards and alerts
    see them before the first tie, drop or label (Prometheus practice for labelled metrics)."""
    for metric in (GROUPS, RESPONSES, NO_ANSWER, UNANIMOUS, TIED, COMPARE_TIMEOUTS, LABELLED, LABEL_CORRECT,
                   PASS_AT_N, LABELLED_RESPONSES, REWARD_AGREE):
        metric.labels(reward_mode)
    for reason in DROP_REASONS:
        DROPPED.labels(reward_mode, reason)


def observe(vote) -> None:
    mode = vote.reward_mode
    GROUPS.labels(mode).inc()
    RESPONSES.labels(mode).inc(len(vote.rewards))
    NO_ANSWER.labels(mode).inc(sum(a is None for a in vote.answers))
    UNANIMOUS.labels(mode).inc(int(vote.unanimous))
    TIED.labels(mode).inc(int(vote.tied))
    if vote.drop_reason is not None:
        DROPPED.labels(mode, vote.drop_reason).inc()
    COMPARE_TIMEOUTS.labels(mode).inc(vote.compare_timeouts)
    MAJORITY_RATIO.labels(mode).observe(vote.majority_ratio)
    NO_ANSWER_RATE.labels(mode).observe(vote.no_answer_rate)
    VOTE_ENTROPY.labels(mode).observe(vote.vote_entropy)
    LATENCY.labels(mode).observe(vote.seconds)
    if vote.label_correct is not None:
        LABELLED.labels(mode).inc()
        LABEL_CORRECT.labels(mode).inc(int(vote.label_correct))
        PASS_AT_N.labels(mode).inc(int(bool(vote.pass_at_n)))
        LABELLED_RESPONSES.labels(mode).inc(len(vote.rewards))
        REWARD_AGREE.labels(mode).inc(round(vote.reward_accuracy * len(vote.rewards)))
