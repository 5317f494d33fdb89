"""Answer equivalence used for voting and rewards: MathRuler's rules (default), math-verify, exact.

`equal(answer, reference)` judges `answer` against `reference` (a gold answer, or the representative
of a vote class), in that order, as upstream calls MathRuler's `grade_answer(given, ground_truth)`.
Every grader treats identical strings as equal (a vote needs that even where a verifier cannot parse
the answer, e.g. math-verify on `blue`).

Symbolic work is bounded in time (see `symbolic.py`): a `Budget` is the wall-clock time a caller
allows; `vote()` gives each group one budget of `compare_timeout_s`, so a group never spends more
than that on symbolic comparisons. A comparison that runs out of time counts as not equal and is
counted in `budget.timeouts`. String normalisation (the fast path) stays in this process.
"""
from __future__ import annotations

import re
import time
from fractions import Fraction
from functools import lru_cache

from .symbolic import SymbolicPool

# Answers longer than this are compared entirely in the worker: MathRuler's LaTeX normalisation
# costs ~20 us a character in-process (a 60 kB answer takes over a second), so only short answers,
# which is nearly all real ones, take the in-process fast path.
FAST_PATH_MAX_CHARS = 256


class Budget:
    """Wall-clock time allowed for the symbolic comparisons of one caller (one group, one check)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.timeouts = 0

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


class Grader:
    name = "grader"

    def __init__(self, compare_timeout_s: float = 1.0):
        self.compare_timeout_s = compare_timeout_s

    def budget(self) -> Budget:
        return Budget(self.compare_timeout_s)

    def equal(self, answer: str, reference: str, budget: Budget | None = None) -> bool:
        raise NotImplementedError

    def start(self, wait: bool = False) -> None:
        """Start helper processes now, so the first comparison does not wait for them; with `wait`,
        return once they are ready."""

    def close(self) -> None:
        """Stop helper processes."""


_TEXT = re.compile(r"\\text\{([^{}]*)\}")


def normalize(answer: str) -> str:
    s = _TEXT.sub(r"\1", answer.strip())
    s = s.replace("\\!", "").replace("\\,", "").replace("$", "")
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".").lower()


class ExactGrader(Grader):
    """Equal after light normalisation (whitespace, `\\text{}`, `$`, trailing period, case)."""
    name = "exact"

    def equal(self, answer: str, reference: str, budget: Budget | None = None) -> bool:
        return answer == reference or normalize(answer) == normalize(reference)


class _SymbolicGrader(Grader):
    preload = "mathruler"

    def __init__(self, compare_timeout_s: float = 1.0):
        super().__init__(compare_timeout_s)
        self.symbolic = SymbolicPool(self.preload)

    def start(self, wait: bool = False) -> None:
        self.symbolic.start(wait)

    def close(self) -> None:
        self.symbolic.close()

    def _symbolic(self, request: dict, budget: Budget | None) -> bool:
        budget = budget or self.budget()
        result = self.symbolic.compare(request, min(budget.remaining(), self.compare_timeout_s),
                                       full_timeout=self.compare_timeout_s)
        if result is None:
            budget.timeouts += 1
            return False
        return result


# ---- MathRuler's rules ----------------------------------------------------------------------------
_INT = re.compile(r"-?\d+")
_DECIMAL = re.compile(r"-?\d+\.\d+")


@lru_cache(maxsize=16384)
def _mathruler_forms(answer: str) -> tuple[str, str]:
    """MathRuler's two normal forms of an answer: the MATH (mathd) one and its own `_normalize`."""
    from mathruler.grader import _normalize
    from mathruler.math_normalize import normalize_answer

    return normalize_answer(answer), _normalize(answer)


def _numeric_equal(truth: str, given: str) -> bool | None:
    """sympy's verdict on two plain numerals, without sympy; None when not that simple.

    Integers parse to exact sympy Integers. Decimals with at most 15 significant digits parse to
    53-bit Floats that differ whenever the decimals differ, so comparing them exactly is the same.
    """
    if _INT.fullmatch(truth) and _INT.fullmatch(given) and max(len(truth), len(given)) <= 4000:
        return int(truth) == int(given)
    numerals = (truth, given)
    if all(_INT.fullmatch(x) or _DECIMAL.fullmatch(x) for x in numerals) and \
            all(len(x.lstrip("-").replace(".", "").lstrip("0")) <= 15 for x in numerals):
        return Fraction(truth) == Fraction(given)
    return None


class MathRulerGrader(_SymbolicGrader):
    """MathRuler's `grade_answer` rules (the upstream MM-UPT grader, for paper parity).

    The string normalisations, the tuple/interval split and the fraction and integer rules run here
    using MathRuler's own normalisers; only the sympy `simplify(a - b) == 0` step (and whole
    comparisons of very long answers) goes to the time-bounded worker.
    """
    name = "mathruler"

    def __init__(self, compare_timeout_s: float = 1.0):
        super().__init__(compare_timeout_s)
        _mathruler_forms("\\frac{1}{2}")  # import MathRuler and its LaTeX parser now, not in a group's budget

    def equal(self, answer: str, reference: str, budget: Budget | None = None) -> bool:
        if answer == reference:
            return True
        if max(len(answer), len(reference)) > FAST_PATH_MAX_CHARS:
            return self._symbolic({"op": "mathruler", "given": answer, "truth": reference}, budget)
        from mathruler.grader import _is_frac, _str_is_int, should_allow_eval, split_tuple

        (given_mathd, given), (truth_mathd, truth) = _mathruler_forms(answer), _mathruler_forms(reference)
        if given_mathd == truth_mathd or given == truth:
            return True
        if not given:
            return False
        truth_elems, given_elems = split_tuple(truth), split_tuple(given)
        if len(truth_elems) > 1 and (truth[0] != given[0] or truth[-1] != given[-1]):
            return False  # a tuple against an interval, or brackets that differ
        if len(truth_elems) != len(given_elems):
            return False
        needs_sympy = []
        for t, g in zip(truth_elems, given_elems):
            if _is_frac(t) and _is_frac(g):
                ok = t == g  # unreduced fractions must match exactly
            elif _str_is_int(t) != _str_is_int(g):
                ok = False  # an integer answer needs an integer
            else:
                ok = _numeric_equal(t, g)
                if ok is None:
                    if not should_allow_eval(f"({t})-({g})"):
                        return False  # MathRuler refuses to evaluate it (too many unknowns, towers of powers)
                    needs_sympy.append([t, g])
                    continue
            if not ok:
                return False
        return not needs_sympy or self._symbolic({"op": "sympy", "pairs": needs_sympy}, budget)


class MathVerifyGrader(_SymbolicGrader):
    """HuggingFace math-verify: more lenient (sets, relations, units, numeric tolerance).

    Parsing and verifying both run in the worker (math-verify's parser evaluates what it parses);
    each answer is parsed as the `\\boxed{}` it came from. Slower than MathRuler: ~10-100 ms per new
    answer, so raise `compare_timeout_s` for groups with many distinct answers.
    """
    name = "math_verify"
    preload = "math_verify"

    def equal(self, answer: str, reference: str, budget: Budget | None = None) -> bool:
        if answer == reference:
            return True
        return self._symbolic({"op": "math_verify", "given": answer, "gold": reference}, budget)


GRADERS = {"mathruler": MathRulerGrader, "math_verify": MathVerifyGrader, "exact": ExactGrader}


def make_grader(name: str = "mathruler", compare_timeout_s: float = 1.0) -> Grader:
    """A grader by name: "mathruler" (default, paper parity), "math_verify" or "exact"."""
    if name not in GRADERS:
        raise ValueError(f"unknown grader {name!r}; choose one of {', '.join(GRADERS)}")
    if compare_timeout_s <= 0:
        raise ValueError("compare_timeout_s must be positive")
    return GRADERS[name](compare_timeout_s)
