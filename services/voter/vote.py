"""Majority vote over equivalence classes, and the rewards it implies.

Deliberate fixes of the upstream hazards: a missing answer never votes and always gets reward 0;
votes are counted over equivalence classes, not raw strings; a tie goes to the class seen first.
"""
from __future__ import annotations

import math

from mmupt.wire import Vote

from .extract import extract_boxed
from .grading import Grader


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


def vote(responses: list[str], grader: Grader, mode: str = "majority", hidden_answer: str | None = None) -> Vote:
    answers = [extract_boxed(r) for r in responses]
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
