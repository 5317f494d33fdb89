"""Extraction and majority vote (skeleton semantics; the voter issue adds graders and options)."""
import math

import pytest

from mmupt.services.voter.extract import extract_boxed
from mmupt.services.voter.grading import ExactGrader
from mmupt.services.voter.vote import vote


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
