"""Prometheus metrics of the voter."""
from prometheus_client import Counter, Histogram

GROUPS = Counter("mmupt_voter_groups_total", "Groups voted", ["reward_mode"])
RESPONSES = Counter("mmupt_voter_responses_total", "Responses voted")
NO_ANSWER = Counter("mmupt_voter_no_answer_total", "Responses without an extractable final answer")
UNANIMOUS = Counter("mmupt_voter_unanimous_groups_total", "Groups where every response agrees (zero advantage)")
LABEL_CORRECT = Counter("mmupt_voter_label_correct_total", "Groups whose majority equals the hidden label (monitoring)")
LABELLED = Counter("mmupt_voter_labelled_groups_total", "Groups that carried a hidden label (monitoring)")
DEADLETTERED = Counter("mmupt_voter_deadlettered_total", "Group entries sent to the dead-letter stream")
_RATIO_BUCKETS = [i / 10 for i in range(1, 11)]
MAJORITY_RATIO = Histogram("mmupt_voter_majority_ratio", "Share of a group in its majority class", buckets=_RATIO_BUCKETS)
VOTE_ENTROPY = Histogram("mmupt_voter_vote_entropy", "Entropy (nats) of a group's answer classes",
                         buckets=[0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0])
LATENCY = Histogram("mmupt_voter_group_seconds", "Time to vote one group",
                    buckets=[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5])


def observe(vote) -> None:
    GROUPS.labels(vote.reward_mode).inc()
    RESPONSES.inc(len(vote.rewards))
    NO_ANSWER.inc(sum(a is None for a in vote.answers))
    UNANIMOUS.inc(int(vote.unanimous))
    MAJORITY_RATIO.observe(vote.majority_ratio)
    VOTE_ENTROPY.observe(vote.vote_entropy)
    if vote.label_correct is not None:
        LABELLED.inc()
        LABEL_CORRECT.inc(int(vote.label_correct))
