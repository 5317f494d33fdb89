"""Answer equivalence used for voting and rewards."""
from __future__ import annotations

import re
from typing import Protocol


class Grader(Protocol):
    name: str

    def equal(self, a: str, b: str) -> bool: ...


_TEXT = re.compile(r"\\text\{([^{}]*)\}")


def normalize(answer: str) -> str:
    s = _TEXT.sub(r"\1", answer.strip())
    s = s.replace("\\!", "").replace("\\,", "").replace("$", "")
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".").lower()


class ExactGrader:
    """Equal after light normalisation (whitespace, `\\text{}`, `$`, trailing period, case)."""
    name = "exact"

    def equal(self, a: str, b: str) -> bool:
        return normalize(a) == normalize(b)


def make_grader(name: str) -> Grader:
    if name == "exact":
        return ExactGrader()
    raise ValueError(f"unknown grader {name!r}")
