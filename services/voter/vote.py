"""Majority vote over equivalence classes, and the rewards it implies.

Deliberate fixes of upstream hazards (MM-UPT counts raw strings with `Counter`, rewards by
`grade_answer(answer, majority)`, and turns a missing answer into the string "None"):
- a missing answer never votes and always gets reward 0;
- votes are counted over equivalence classes, and a response gets reward 1 exactly when it is in the
  winning class, so the vote share and the rewards always agree;
- a tie is a named policy (earliest class, seeded random, or drop the group), not an accident of order.

Classes: each answer joins the first class whose representative (its first member) it equals, judged
`grader.equal(answer, representative)`, the order upstream uses for `grade_answer(answer, majority)`;
identical strings always share a class. The pseudo-label is the winning class's representative.
"""
from __future__ import annotations

import math
import random
import re
import time
from collections import Counter
from dataclasses import dataclass

from mmupt.wire import Vote

from .extract import ANSWER_FORMS, extract_answer
from .grading import Budget, Grader

REWARD_MODES = ("majority", "ground_truth")
TIE_POLICIES = ("earliest", "random", "drop")
BELOW_MIN_AGREEMENT = ("drop", "zero")


@dataclass(frozen=True)
class VotePolicy:
    """How a group's vote turns into rewards (the `voter` config section)."""
    tie_policy: str = "earliest"        # earliest class wins | random (seeded per group) | drop the group
    tie_seed: int = 0
    min_agreement: float = 0.0          # majority share below which the group is dropped or zeroed
    below_min_agreement: str = "drop"   # drop | zero (all rewards 0: zero advantage)
    answer_forms: tuple[str, ...] = ()  # extra final-answer forms, see extract.py

    def __post_init__(self):
        if self.tie_policy not in TIE_POLICIES:
            raise ValueError(f"tie_policy must be one of {TIE_POLICIES}, got {self.tie_policy!r}")
        if self.below_min_agreement not in BELOW_MIN_AGREEMENT:
            raise ValueError(f"below_min_agreement must be one of {BELOW_MIN_AGREEMENT}, "
                             f"got {self.below_min_agreement!r}")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"min_agreement must be within [0, 1], got {self.min_agreement!r}")
        unknown = set(self.answer_forms) - set(ANSWER_FORMS)
        if unknown:
            raise ValueError(f"answer_forms: unknown {sorted(unknown)}; choose from {ANSWER_FORMS}")

    @classmethod
    def from_settings(cls, voter) -> VotePolicy:
        return cls(tie_policy=voter.tie_policy, tie_seed=voter.tie_seed, min_agreement=voter.min_agreement,
                   below_min_agreement=voter.below_min_agreement, answer_forms=tuple(voter.extra_answer_forms))


# ---- multiple choice ------------------------------------------------------------------------------
# `B`, `(B)`, `B.`, `B)`, `B: 5 cm`, `(B) 5 cm`, `Option B`: a capital letter, alone or leading.
_CHOICE = re.compile(r"(?i:option\s*)?\(?([A-Z])\)?(?:[.:)]\s*.*|\s+.*)?", re.DOTALL)
_WRAPPED = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{(.*)\}", re.DOTALL)
_LETTER_PREFIX = re.compile(r"^\(?[A-Z][.:)]\s*")  # "(A) ", "A. ", "A: " at the start of an option


def _unwrap(answer: str) -> str:
    s = answer.strip().strip("$").strip()
    match = _WRAPPED.fullmatch(s)
    return match.group(1).strip() if match else s


def canonical_choice(answer: str | None, options: list[str], grader: Grader, budget: Budget | None = None) -> str | None:
    """With multiple-choice options, map `B`, `(B)`, `(B) 5 cm` and `5 cm` to the letter `B`.

    An answer that names no option stays as it is (it still votes, as its own class).
    """
    if answer is None or not options:
        return answer
    match = _CHOICE.fullmatch(_unwrap(answer))
    if match and ord(match.group(1)) - ord("A") < len(options):
        return match.group(1)
    for index, option in enumerate(options):
        texts = {option, _LETTER_PREFIX.sub("", option, count=1)}  # options may carry their own "(A) "
        if any(text and grader.equal(answer, text, budget) for text in texts):
            return chr(ord("A") + index)
    return answer


def is_correct(response: str, gold: str, grader: Grader, options: list[str] | None = None,
               answer_forms: tuple[str, ...] = ()) -> bool:
    """Whether one response's final answer matches a known answer (evaluation, never training)."""
    answer = extract_answer(response, answer_forms)
    if answer is None:
        return False
    budget = grader.budget()
    if options:
        return canonical_choice(answer, options, grader, budget) == canonical_choice(gold, options, grader, budget)
    return grader.equal(answer, gold, budget)


# ---- the vote -------------------------------------------------------------------------------------
def classify(answers: list[str | None], grader: Grader,
             budget: Budget | None = None) -> tuple[list[int | None], list[str]]:
    """Class index per answer (None for a missing one), and each class's representative (its first
    member); classes are numbered in order of first sight."""
    representatives: list[str] = []
    seen: dict[str, int] = {}
    out: list[int | None] = []
    for answer in answers:
        if answer is None:
            out.append(None)
            continue
        if answer not in seen:
            seen[answer] = next((i for i, rep in enumerate(representatives) if grader.equal(answer, rep, budget)),
                                len(representatives))
            if seen[answer] == len(representatives):
                representatives.append(answer)
        out.append(seen[answer])
    return out, representatives


def pick_winner(counts: Counter, representatives: list[str], policy: VotePolicy, key: str) -> tuple[int | None, bool]:
    """The winning class and whether the top was tied. Classes are numbered in order of first sight,
    so "earliest" (upstream's behaviour, the default) is the smallest tied number."""
    if not counts:
        return None, False
    top = max(counts.values())
    tied = sorted(c for c, k in counts.items() if k == top)
    if len(tied) > 1 and policy.tie_policy == "random":
        # Seeded by the group's key, so a re-delivered group gets the same winner; drawn from the tied
        # classes sorted by representative, so the sample order does not matter.
        tied_by_label = sorted(tied, key=lambda c: representatives[c])
        return random.Random(f"{policy.tie_seed}:{key}").choice(tied_by_label), True
    return tied[0], len(tied) > 1


def _entropy(counts: Counter) -> float:
    total = sum(counts.values())
    return -sum((k / total) * math.log(k / total) for k in counts.values()) if total else 0.0


def _canonical_choices(answers: list[str | None], hidden_answer: str | None, options: list[str], grader: Grader,
                       budget: Budget) -> tuple[list[str | None], str | None]:
    """Map each distinct answer, and the hidden answer, to its option letter where it names one."""
    choices = {a: canonical_choice(a, options, grader, budget) for a in dict.fromkeys(answers) if a is not None}
    answers = [choices[a] if a is not None else None for a in answers]
    if hidden_answer is not None:
        hidden_answer = canonical_choice(hidden_answer, options, grader, budget)
    return answers, hidden_answer


def _apply_policy(majority_rewards: list[float], majority_ratio: float, tied: bool,
                  policy: VotePolicy) -> tuple[list[float], str | None]:
    """The rewards the majority vote gives after the agreement and tie policies, and why it is dropped."""
    n = len(majority_rewards)
    if majority_ratio < policy.min_agreement:
        return [0.0] * n, "min_agreement" if policy.below_min_agreement == "drop" else None
    if tied and policy.tie_policy == "drop":
        return [0.0] * n, "tie"
    return majority_rewards, None


def vote(responses: list[str], grader: Grader, mode: str = "majority", hidden_answer: str | None = None,
         options: list[str] | None = None, *, policy: VotePolicy | None = None, key: str = "") -> Vote:
    """Vote one group. With `options` (multiple choice), a letter and its option text are one class.

    `hidden_answer` is read for rewards only in mode "ground_truth" (the supervised baseline, where the
    tie and agreement policies do not apply); in "majority" mode it only feeds the monitoring fields.
    `key` (the group id) seeds random tie-breaks. Symbolic comparisons of the whole group share one
    budget of `grader.compare_timeout_s`.
    """
    if mode not in REWARD_MODES:
        raise ValueError(f"unknown reward mode {mode!r}; choose one of {REWARD_MODES}")
    if mode == "ground_truth" and hidden_answer is None:
        raise ValueError("ground_truth reward mode needs the hidden answer")
    if not responses:
        raise ValueError("a group needs at least one response")
    started = time.perf_counter()
    policy = policy or VotePolicy()
    budget = grader.budget()
    answers = [extract_answer(r, policy.answer_forms) for r in responses]
    if options:
        answers, hidden_answer = _canonical_choices(answers, hidden_answer, options, grader, budget)
    classes, representatives = classify(answers, grader, budget)
    counts = Counter(c for c in classes if c is not None)
    winner, tied = pick_winner(counts, representatives, policy, key)
    n = len(responses)
    pseudo_label = representatives[winner] if winner is not None else None
    majority_ratio = counts[winner] / n if winner is not None else 0.0
    majority_rewards = [1.0 if c is not None and c == winner else 0.0 for c in classes]

    if mode == "ground_truth":
        rewards, drop_reason = None, None  # set from the labels below
    else:
        rewards, drop_reason = _apply_policy(majority_rewards, majority_ratio, tied, policy)
        if drop_reason == "tie":
            pseudo_label = None  # a tie has no majority (and "earliest" would depend on sample order)

    monitoring = {}
    if hidden_answer is not None:
        verdicts = {a: grader.equal(a, hidden_answer, budget) for a in dict.fromkeys(answers) if a is not None}
        true_rewards = [1.0 if a is not None and verdicts[a] else 0.0 for a in answers]
        rewards = true_rewards if mode == "ground_truth" else rewards
        monitoring = dict(label_correct=pseudo_label is not None and verdicts[pseudo_label],
                          reward_accuracy=sum(m == t for m, t in zip(majority_rewards, true_rewards)) / n,
                          pass_at_n=any(true_rewards))
    return Vote(
        rewards=rewards, answers=answers, pseudo_label=pseudo_label, majority_ratio=majority_ratio,
        vote_entropy=_entropy(counts), no_answer_rate=(n - sum(counts.values())) / n,
        unanimous=winner is not None and counts[winner] == n, reward_mode=mode, tied=tied,
        drop_reason=drop_reason, compare_timeouts=budget.timeouts, seconds=time.perf_counter() - started,
        **monitoring,
    )
