"""Extraction, the majority vote and its policies, multiple choice (with the exact grader unless noted)."""
import math
import random

import pytest

from mmupt.services.voter.extract import extract_answer, extract_boxed
from mmupt.services.voter.grading import ExactGrader
from mmupt.services.voter.vote import VotePolicy, vote


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{3}.", "3"),
    ("\\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{ 7 }", "7"),
    ("no box here", None),
    ("\\boxed{3", None),            # truncated: never closes
    ("\\boxed{\\frac{1}{2}", None),
    ("\\boxed{}", None),
])
def test_extract_last_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_missing_answers_never_win_and_get_zero():
    # Upstream turns missing answers into the string "None", which wins here (3 of 5) and gets reward 1.
    result = vote(["no answer", "still none", "truncated \\boxed{4", "\\boxed{3}", "\\boxed{5}"], ExactGrader())
    assert result.pseudo_label == "3"  # tie between 3 and 5 goes to the earliest
    assert result.rewards == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert result.no_answer_rate == pytest.approx(0.6)


def test_all_missing_gives_no_label_and_zero_rewards():
    result = vote(["a", "b"], ExactGrader())
    assert result.pseudo_label is None and result.rewards == [0.0, 0.0] and result.majority_ratio == 0.0


def test_vote_over_equivalence_classes():
    result = vote(["\\boxed{ 3 }", "\\boxed{3.}", "\\boxed{4}", "\\boxed{4}", "\\boxed{\\text{3}}"], ExactGrader())
    assert result.pseudo_label == " 3 ".strip() and result.rewards == [1, 1, 0, 0, 1]
    assert result.majority_ratio == pytest.approx(0.6)
    assert result.vote_entropy == pytest.approx(-(0.6 * math.log(0.6) + 0.4 * math.log(0.4)))


def test_monitoring_with_hidden_label_and_ground_truth_mode():
    responses = ["\\boxed{2}", "\\boxed{2}", "\\boxed{3}"]
    majority = vote(responses, ExactGrader(), hidden_answer="3")
    assert majority.rewards == [1, 1, 0] and majority.label_correct is False
    assert majority.reward_accuracy == 0.0
    supervised = vote(responses, ExactGrader(), mode="ground_truth", hidden_answer="3")
    assert supervised.rewards == [0, 0, 1] and supervised.reward_mode == "ground_truth"


def test_unanimous_flag():
    assert vote(["\\boxed{1}"] * 3, ExactGrader()).unanimous
    assert not vote(["\\boxed{1}", "\\boxed{1}", "x"], ExactGrader()).unanimous


def test_multiple_choice_letter_and_text_are_one_class():
    from mmupt.services.voter.vote import is_correct

    options = ["3 cm", "5 cm", "7 cm"]
    result = vote(["\\boxed{B}", "\\boxed{(B) 5 cm}", "\\boxed{5 cm}", "\\boxed{A}"], ExactGrader(), options=options,
                  hidden_answer="5 cm")
    assert result.pseudo_label == "B" and result.rewards == [1, 1, 1, 0] and result.label_correct
    assert is_correct("so \\boxed{(C)}", "7 cm", ExactGrader(), options)
    assert not is_correct("so \\boxed{A}", "7 cm", ExactGrader(), options)
    assert is_correct("\\boxed{4}", "4", ExactGrader())


# ---- extraction forms ------------------------------------------------------------------------------

@pytest.mark.parametrize("text,forms,expected", [
    ("The answer is 5.", (), None),                                    # off by default, as upstream
    ("The answer is 5.", ("answer_is",), "5"),
    ("so the final answer is: $\\frac{1}{2}$.\n", ("answer_is",), "\\frac{1}{2}"),
    ("Final Answer: **(B)**", ("answer_is",), "(B)"),
    ("the answer is 3\nthen the answer is 4", ("answer_is",), "4"),     # the last one
    ("the answer isn't obvious", ("answer_is",), None),
    ("<think>...</think><answer> 12 </answer>", ("answer_tag",), "12"),
    ("<answer>12", ("answer_tag",), None),                             # truncated tag
    ("<answer>\\boxed{7}</answer>", ("answer_tag",), "7"),              # a box always wins
    ("The answer is 5 but \\boxed{6}", ("answer_is",), "6"),
    ("The answer is 5 then \\boxed{6", ("answer_is",), None),           # truncated box: no answer
    ("<answer>1</answer> The answer is 2", ("answer_tag", "answer_is"), "1"),  # forms in the order given
])
def test_extra_answer_forms(text, forms, expected):
    assert extract_answer(text, forms) == expected


def test_unknown_answer_form_is_refused():
    with pytest.raises(ValueError, match="answer_forms"):
        VotePolicy(answer_forms=("last_number",))


# ---- policies ----------------------------------------------------------------------------------------
TIED = ["\\boxed{4}", "\\boxed{7}", "\\boxed{7}", "\\boxed{4}", "no answer"]


def test_tie_earliest_is_the_default():
    result = vote(TIED, ExactGrader())
    assert result.tied and result.pseudo_label == "4" and result.rewards == [1, 0, 0, 1, 0]
    assert result.drop_reason is None


def test_tie_drop_emits_a_dropped_group_with_zero_rewards():
    result = vote(TIED, ExactGrader(), policy=VotePolicy(tie_policy="drop"))
    assert result.drop_reason == "tie" and result.rewards == [0.0] * 5 and result.tied and result.pseudo_label is None
    untied = vote(TIED[:3], ExactGrader(), policy=VotePolicy(tie_policy="drop"))
    assert untied.drop_reason is None and untied.pseudo_label == "7"


def test_tie_random_is_seeded_per_group_and_fair():
    policy = VotePolicy(tie_policy="random", tie_seed=3)
    winners = [vote(TIED, ExactGrader(), policy=policy, key=f"g{i}").pseudo_label for i in range(200)]
    assert 60 < winners.count("4") < 140 and winners.count("4") + winners.count("7") == 200
    # the same group (key) always gets the same winner: a re-delivered group is scored the same
    assert {vote(TIED, ExactGrader(), policy=policy, key="g7").pseudo_label for _ in range(5)} == {winners[7]}
    # the seed matters, and the sample order does not
    reseeded = [vote(TIED, ExactGrader(), policy=VotePolicy(tie_policy="random", tie_seed=4), key=f"g{i}").pseudo_label
                for i in range(200)]
    assert reseeded != winners
    assert [vote(TIED[::-1], ExactGrader(), policy=policy, key=f"g{i}").pseudo_label for i in range(200)] == winners


@pytest.mark.parametrize("below,reason,rewards", [("drop", "min_agreement", [0.0] * 5), ("zero", None, [0.0] * 5)])
def test_min_agreement(below, reason, rewards):
    group = ["\\boxed{1}", "\\boxed{1}", "\\boxed{2}", "\\boxed{3}", "none"]  # majority share 0.4
    policy = VotePolicy(min_agreement=0.5, below_min_agreement=below)
    result = vote(group, ExactGrader(), policy=policy)
    assert result.majority_ratio == pytest.approx(0.4) and result.drop_reason == reason and result.rewards == rewards
    assert result.pseudo_label == "1"  # still reported for monitoring
    enough = vote(group, ExactGrader(), policy=VotePolicy(min_agreement=0.4, below_min_agreement=below))
    assert enough.drop_reason is None and enough.rewards == [1, 1, 0, 0, 0]


def test_all_missing_is_below_any_min_agreement():
    result = vote(["x", "y"], ExactGrader(), policy=VotePolicy(min_agreement=0.1))
    assert result.drop_reason == "min_agreement" and result.pseudo_label is None


def test_policies_do_not_touch_the_supervised_baseline():
    policy = VotePolicy(tie_policy="drop", min_agreement=0.9)
    result = vote(TIED, ExactGrader(), mode="ground_truth", hidden_answer="7", policy=policy)
    assert result.drop_reason is None and result.rewards == [0, 1, 1, 0, 0] and result.reward_mode == "ground_truth"
    with pytest.raises(ValueError, match="hidden answer"):
        vote(TIED, ExactGrader(), mode="ground_truth")
    with pytest.raises(ValueError, match="reward mode"):
        vote(TIED, ExactGrader(), mode="self_certainty")


@pytest.mark.parametrize("field,value", [("tie_policy", "coin"), ("below_min_agreement", "skip"),
                                         ("min_agreement", 1.5)])
def test_bad_policy_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        VotePolicy(**{field: value})


def test_policy_from_settings():
    from mmupt.config import load_settings

    settings = load_settings(environ={"MMUPT_VOTER__TIE_POLICY": "random", "MMUPT_VOTER__MIN_AGREEMENT": "0.3",
                                      "MMUPT_VOTER__EXTRA_ANSWER_FORMS": "[answer_tag]"})
    policy = VotePolicy.from_settings(settings.voter)
    assert policy == VotePolicy(tie_policy="random", min_agreement=0.3, answer_forms=("answer_tag",))


def test_votes_and_rewards_always_agree():
    """Over many random groups: reward 1 exactly for the winning class, whose share is majority_ratio."""
    rng = random.Random(0)
    forms = ["\\boxed{3}", "\\boxed{ 3 }", "\\boxed{\\text{3}}", "\\boxed{4}", "\\boxed{5}", "none", "\\boxed{6"]
    for _ in range(300):
        group = [rng.choice(forms) for _ in range(rng.randint(1, 12))]
        result = vote(group, ExactGrader(), hidden_answer="3")
        assert sum(result.rewards) == pytest.approx(result.majority_ratio * len(group))
        assert all(r == 0 for r, a in zip(result.rewards, result.answers) if a is None)
        assert result.unanimous == (result.majority_ratio == 1.0)
        assert result.pass_at_n == any(a is not None and a.strip() in {"3", "\\text{3}"} for a in result.answers)


# ---- multiple choice -----------------------------------------------------------------------------------
@pytest.mark.parametrize("answer", ["B", "(B)", "B.", "B)", "B: 5 cm", "(B) 5 cm", "Option B", "option (B)",
                                    "\\text{(B)}", "$B$", "5 cm", "5"])
def test_multiple_choice_forms_map_to_the_letter(answer):
    from mmupt.services.voter.grading import make_grader
    from mmupt.services.voter.vote import canonical_choice

    grader = make_grader("mathruler")
    try:
        assert canonical_choice(answer, ["3 cm", "5 cm", "7 cm"], grader) == "B"
    finally:
        grader.close()


def test_multiple_choice_edge_cases():
    from mmupt.services.voter.vote import canonical_choice

    g = ExactGrader()
    assert canonical_choice("D", ["1", "2", "3"], g) == "D"           # no such option: stays an answer of its own
    assert canonical_choice("Both", ["a", "b"], g) == "Both"           # a word, not the letter B
    assert canonical_choice("9 cm", ["(A) 3 cm", "(B) 9 cm"], g) == "B"  # options that carry their own letters
    assert canonical_choice("x=3", ["x = B: 3", "x=3"], g) == "B"         # only a leading letter is a label
    assert canonical_choice("c", ["$a$", "$b$", "$c$"], g) == "C"      # MATH-V style option texts
    assert canonical_choice("C", ["A", "B", "C", "D", "E"], g) == "C"  # MATH-V style letter-only options
    assert canonical_choice(None, ["A"], g) is None
