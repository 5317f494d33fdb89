"""Graders: MathRuler parity of the fast path, time bounds on symbolic work, robustness."""
import json
import threading
import time
from pathlib import Path

import pytest
from mathruler.grader import grade_answer

from mmupt.services.voter.grading import FAST_PATH_MAX_CHARS, make_grader
from mmupt.services.voter.vote import vote

DATA = Path(__file__).parent / "data" / "voter"
# Hostile answers: sympy cannot finish these (a factorial of 10^8, a tower of powers) in any useful time.
HOSTILE = ["99999999!", "\\sqrt{99999999!}", "10**10**10"]


# Margin over the time bound that the tests allow: the machine may be shared and busy.
MARGIN_S = 1.0


@pytest.fixture(scope="module")
def mathruler():
    """The default bound (1 s): for the time-bound tests."""
    g = make_grader("mathruler", compare_timeout_s=1.0)
    g.start(wait=True)
    yield g
    g.close()


@pytest.fixture(scope="module")
def patient():
    """A generous bound, for tests about verdicts: a busy machine must not turn them into timeouts."""
    g = make_grader("mathruler", compare_timeout_s=30.0)
    g.start(wait=True)
    yield g
    g.close()


def realistic_pairs() -> list[tuple[str, str]]:
    """Answer pairs of the kinds a voter sees, plus every pair in the external sets."""
    forms = ["3", "3.0", "1,000", "1000", "0.5", ".5", "\\frac{1}{2}", "1/2", "\\frac{2}{4}", "50\\%", "2\\sqrt{2}",
             "\\sqrt 8", "\\frac{\\pi}{2}", "(1, 2)", "[1, 2)", "\\left( 1, 2 \\right)", "(x+1)^2", "x^2+2x+1",
             "y = 2x", "30^\\circ", "30 degrees", "\\text{blue}", "Blue", "5\\text{ cm}", "(A)", "1\\frac{1}{4}",
             "10^{3}", "1e3", "\\{1,2\\}", "1 and 2", "7 3/4", ""]
    pairs = [(a, b) for a in forms for b in forms]
    for row in map(json.loads, (DATA / "hendrycks_is_equiv.jsonl").open()):
        pairs += [(row["a"], row["b"]), (row["b"], row["a"])]
    math500 = [json.loads(line)["answer"] for line in (DATA / "mathruler_math500.jsonl").open()]
    pairs += [(a, b) for a, b in zip(math500, math500[1:] + math500[:1])]
    pairs += [(a.replace("\\frac", "\\dfrac"), a) for a in math500]
    return pairs


def test_fast_path_agrees_with_mathruler_grade_answer(patient):
    """Our in-process rules + the worker's sympy step give exactly MathRuler's verdict on every pair."""
    pairs = realistic_pairs()
    assert len(pairs) > 2000
    budget = patient.budget()
    budget.deadline = float("inf")  # verdicts, not time, are under test here
    differ = [(a, b) for a, b in pairs if patient.equal(a, b, budget) != grade_answer(a, b)]
    assert differ == [] and budget.timeouts == 0


def test_long_answers_are_compared_whole_in_the_worker(patient):
    long_a = "\\frac{1}{2}+" * 40 + "1"
    long_b = "1+" + "\\frac{1}{2}+" * 40
    assert len(long_a) > FAST_PATH_MAX_CHARS
    dfrac = long_a.replace("\\frac", "\\dfrac")
    assert patient.equal(dfrac, long_a) == grade_answer(dfrac, long_a) is True
    assert patient.equal(long_b, long_a) == grade_answer(long_b, long_a)


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_comparison_is_cut_off_and_counted(mathruler, hostile):
    mathruler.start(wait=True)
    budget = mathruler.budget()
    started = time.monotonic()
    assert mathruler.equal(hostile, "2.5", budget) is False
    assert time.monotonic() - started < 1.0 + MARGIN_S
    assert budget.timeouts == 1 and mathruler.symbolic.kills >= 1
    # the busy worker was killed and the spare took over: comparisons go on
    mathruler.start(wait=True)
    assert mathruler.equal("2\\sqrt{2}", "\\sqrt{8}")


def test_a_group_with_hostile_answers_stays_within_the_bound(mathruler):
    """The issue's example and factorials in one group: it finishes within compare_timeout_s plus a margin,
    the honest answers still win, and the timeouts are counted in the vote."""
    group = ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{99999999!}", "\\boxed{\\frac{99999999!}{7}}", "\\boxed{\\sqrt{99999999!}}",
             "\\boxed{0.5}", "\\boxed{1/2}", "\\boxed{\\frac{1}{2}}"]
    mathruler.start(wait=True)
    started = time.monotonic()
    result = vote(group, mathruler, hidden_answer="\\frac{1}{2}")
    assert time.monotonic() - started < 1.0 + MARGIN_S
    assert result.pseudo_label == "0.5" and result.rewards == [0, 0, 0, 0, 1, 1, 1]
    assert result.compare_timeouts >= 1 and result.label_correct


def test_repeated_hostile_answer_costs_its_time_once(mathruler):
    mathruler.start(wait=True)
    first = mathruler.budget()
    mathruler.equal("\\frac{99999999!}{3}", "1.5", first)
    started = time.monotonic()
    again = mathruler.budget()
    assert mathruler.equal("\\frac{99999999!}{3}", "1.5", again) is False
    assert time.monotonic() - started < 0.1 and first.timeouts == again.timeouts == 1


def test_math_verify_grader_is_bounded_on_the_issues_example():
    grader = make_grader("math_verify", compare_timeout_s=2.0)
    grader.start(wait=True)
    try:
        assert grader.equal("0.5", "\\frac{1}{2}") and grader.equal("blue", "blue")
        assert grader.equal("\\sqrt{3}", "\\sqrt{8}") is False
        budget = grader.budget()
        started = time.monotonic()
        assert grader.equal("9^{9^{9^{9}}}", "3", budget) is False  # math-verify evaluates the tower
        assert time.monotonic() - started < 2.0 + MARGIN_S and budget.timeouts == 1
        assert grader.equal("\\sqrt{8}", "2\\sqrt{2}")  # and works at once afterwards
    finally:
        grader.close()


def test_concurrent_callers_get_their_own_answers(patient):
    cases = [("2\\sqrt{2}", "\\sqrt{8}", True), ("\\sqrt{3}", "\\sqrt{8}", False), ("x^2+2x+1", "(x+1)^2", True),
             ("3\\pi", "\\pi+\\pi", False)] * 5
    results = [None] * len(cases)

    def work(i):
        a, b, _ = cases[i]
        results[i] = patient.equal(a, b, patient.budget())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected for _, _, expected in cases]


def test_worker_that_dies_is_replaced(patient):
    patient.equal("\\sqrt{2}", "1.41421")  # make sure a worker is active
    patient.symbolic._active.proc.kill()
    patient.symbolic._active.proc.wait()
    assert patient.equal("3\\sqrt{2}", "\\sqrt{18}")


def test_make_grader_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown grader 'sympy'"):
        make_grader("sympy")
    with pytest.raises(ValueError, match="compare_timeout_s"):
        make_grader("mathruler", compare_timeout_s=0)


def test_exact_grader_needs_no_worker():
    grader = make_grader("exact")
    assert grader.equal("\\text{ Blue }", "blue.") and not grader.equal("0.5", "\\frac{1}{2}")


def test_first_use_without_start_waits_for_the_worker_not_the_budget():
    """Callers such as the eval harness may skip start(): startup must not eat the first comparison's time."""
    grader = make_grader("mathruler", compare_timeout_s=1.0)
    try:
        budget = grader.budget()
        assert grader.equal("2\\sqrt{2}", "\\sqrt{8}", budget) and budget.timeouts == 0
    finally:
        grader.close()
