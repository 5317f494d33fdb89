"""Each upstream hazard has a test that fails on the upstream behaviour and passes here.

`upstream_vote` reproduces what MM-UPT's reward manager does with one group (our few lines, from its
described behaviour: MathRuler's `extract_boxed_content`, which returns the string "None" for a
missing or truncated box; `Counter(answers).most_common(1)`; reward `grade_answer(answer, majority)`).
Every test asserts a property of our vote and asserts that the upstream vote violates it.
"""
import itertools
from collections import Counter

import pytest
from mathruler.grader import extract_boxed_content, grade_answer

from mmupt.services.voter.grading import make_grader
from mmupt.services.voter.vote import VotePolicy, vote


def upstream_vote(responses: list[str]) -> tuple[str, list[float]]:
    answers = [extract_boxed_content(r) for r in responses]
    majority = Counter(answers).most_common(1)[0][0]
    return majority, [1.0 if grade_answer(a, majority) else 0.0 for a in answers]


@pytest.fixture(scope="module")
def grader():
    g = make_grader("mathruler")
    yield g
    g.close()


def test_missing_answers_cannot_win(grader):
    # Three responses never box an answer (one is truncated mid-box); two agree on 3.
    group = ["I am not sure.", "Let me think step by step", "so we get \\boxed{3", "\\boxed{3}", "thus \\boxed{3}"]
    majority, rewards = upstream_vote(group)
    assert majority == "None" and rewards == [1, 1, 1, 0, 0]  # upstream: the non-answers win and are rewarded

    ours = vote(group, grader)
    assert ours.pseudo_label == "3" and ours.rewards == [0, 0, 0, 1, 1]
    assert ours.no_answer_rate == pytest.approx(0.6) and ours.majority_ratio == pytest.approx(0.4)


def test_no_answer_gets_reward_even_when_nobody_answers(grader):
    group = ["no box", "also none"]
    assert upstream_vote(group) == ("None", [1.0, 1.0])  # upstream rewards an all-garbage group fully
    ours = vote(group, grader)
    assert ours.pseudo_label is None and ours.rewards == [0.0, 0.0]


def test_votes_are_counted_over_equivalence_classes(grader):
    # Three responses say one half in three ways; two say 2. Raw strings: "2" has the most votes.
    group = ["\\boxed{0.5}", "\\boxed{\\frac{1}{2}}", "\\boxed{1/2}", "\\boxed{2}", "\\boxed{2}"]
    majority, rewards = upstream_vote(group)
    assert majority == "2" and rewards == [0, 0, 0, 1, 1]  # upstream: the real majority loses

    ours = vote(group, grader)
    assert ours.pseudo_label == "0.5" and ours.rewards == [1, 1, 1, 0, 0]
    assert ours.majority_ratio == pytest.approx(0.6)


def test_vote_share_and_rewards_agree(grader):
    # Raw strings tie 1-1-1 and the first wins, yet equivalence then rewards two responses: the
    # majority share upstream would report (1/3) disagrees with its own rewards (2 of 3).
    group = ["\\boxed{0.5}", "\\boxed{\\frac{1}{2}}", "\\boxed{3}"]
    majority, rewards = upstream_vote(group)
    upstream_share = Counter(extract_boxed_content(r) for r in group)[majority] / len(group)
    assert sum(rewards) / len(group) != upstream_share

    ours = vote(group, grader)
    assert sum(ours.rewards) / len(group) == pytest.approx(ours.majority_ratio) == pytest.approx(2 / 3)


def test_ties_need_not_fall_to_sample_order(grader):
    # A 2-2 tie. Upstream's winner is whichever answer was sampled first, so reordering the same
    # samples flips the pseudo-label.
    group = ["\\boxed{12}", "\\boxed{15}", "\\boxed{15}", "\\boxed{12}"]
    upstream_winners = {upstream_vote(list(p))[0] for p in itertools.permutations(group)}
    assert upstream_winners == {"12", "15"}

    for policy in (VotePolicy(tie_policy="random", tie_seed=1), VotePolicy(tie_policy="drop")):
        results = [vote(list(p), grader, policy=policy, key="group-7") for p in itertools.permutations(group)]
        assert len({r.pseudo_label for r in results}) == 1, policy  # order-independent
        assert all(r.tied for r in results)
        if policy.tie_policy == "drop":
            assert all(r.drop_reason == "tie" and r.pseudo_label is None and sum(r.rewards) == 0 for r in results)
