"""Majority vote over equivalence classes, and the rewards it implies.

Deliberate fixes of the upstream hazards: a missing answer never votes and always gets reward 0;
votes are counted over equivalence classes, not raw strings; a tie goes to the class seen first.
"""
from __future__ import annotations

import math
import re

from mmupt.wire import Vote

from .extract import extract_boxed
from .grading import Grader


_CHOICE = re.compile(r"^\(?([A-Z])\)?[.:]?(?:\s+.*)?$")


def canonical_choice(answer: str | None, options: list[str], grader: Grader) -> str | None:
    """With multiple-choice options, map `B`, `(B)`, `(B) 5 cm` and `5 cm` to the letter `B`."""
    if answer is None or not options:
        return answer
    match = _CHOICE.match(answer.strip())
    if match and ord(match.group(1)) - ord("A") < len(options):
        return match.group(1)
    for index, option in enumerate(options):
        if grader.equal(answer, option):
            return chr(ord("A") + index)
    return answer


def is_correct(response: str, gold: str, grader: Grader, options: list[str] | None = None) -> bool:
    """Whether one response's final answer matches a known answer (evaluation, never training)."""
    answer = extract_boxed(response)
    if answer is None:
        return False
    if options:
        return canonical_choice(answer, options, grader) == canonical_choice(gold, options, grader)
    return grader.equal(answer, gold)


def classify(answers: list[str | None], grader: Grader) -> list[int | None]:
    """Class index per answer (None for a missing one); classes numbered in order of first sight."""
    representatives: list[str] = []
    out: list[int | None] = []
    for answer in answers:
        if answer is None:
            out.append(None)
            continue
        for index, rep in enumerate(representatives):
            if grader.equal(rep, answer):
                out.append(index)
                break
        else:
            representatives.append(answer)
            out.append(len(representatives) - 1)
    return out


def vote(responses: list[str], grader: Grader, mode: str = "majority", hidden_answer: str | None = None,
         options: list[str] | None = None) -> Vote:
    """Vote one group. With `options` (multiple choice), a letter and its option text are one class."""
    answers = [canonical_choice(extract_boxed(r), options or [], grader) for r in responses]
    if options and hidden_answer is not None:
        hidden_answer = canonical_choice(hidden_answer, options, grader)
    classes = classify(answers, grader)
    counts: dict[int, int] = {}
    for c in classes:
        if c is not None:
            counts[c] = counts.get(c, 0) + 1
    n = len(responses)
    winner = max(counts, key=lambda c: (counts[c], -c)) if counts else None  # tie: first seen
    pseudo_label = answers[classes.index(winner)] if winner is not None else None
    majority_rewards = [1.0 if c is not None and c == winner else 0.0 for c in classes]
    if hidden_answer is not None:
        true_rewards = [1.0 if a is not None and grader.equal(a, hidden_answer) else 0.0 for a in answers]
    else:
        true_rewards = None
    if mode == "majority":
        rewards = majority_rewards
    elif mode == "ground_truth":
        if true_rewards is None:
            raise ValueError("ground_truth reward mode needs the hidden answer")
        rewards = true_rewards
    else:
        raise ValueError(f"unknown reward mode {mode!r}")
    answered = sum(counts.values())
    entropy = -sum((k / answered) * math.log(k / answered) for k in counts.values()) if answered else 0.0
    return Vote(
        rewards=rewards, answers=answers, pseudo_label=pseudo_label,
        majority_ratio=(counts[winner] / n) if winner is not None else 0.0,
        vote_entropy=entropy, no_answer_rate=(n - answered) / n if n else 0.0,
        unanimous=winner is not None and counts[winner] == n, reward_mode=mode,
        label_correct=(pseudo_label is not None and grader.equal(pseudo_label, hidden_answer))
        if hidden_answer is not None else None,
        reward_accuracy=(sum(m == t for m, t in zip(majority_rewards, true_rewards)) / n)
        if true_rewards is not None else None,
    )
