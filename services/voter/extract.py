"""Final-answer extraction from a response.

The default is upstream's: the last `\\boxed{...}`, matched to its closing brace with a depth counter.
Other final-answer forms are opt-in (`voter.extra_answer_forms`) and only consulted when the response
has no `\\boxed{` at all: a box that never closes means a truncated response, which has no answer.
"""
from __future__ import annotations

import re

BOXED = "\\boxed{"
ANSWER_FORMS = ("answer_is", "answer_tag")

# "The answer is X", "Final answer: X" (the rest of that line). Linear: no nested quantifiers.
_ANSWER_IS = re.compile(r"\banswer\s*(?:is\b|:)[ \t:]*([^\n]*)", re.IGNORECASE)
_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**"))


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}`, with nested braces; None if absent or never closed."""
    start = text.rfind(BOXED)
    if start < 0:
        return None
    depth, begin = 1, start + len(BOXED)
    for i in range(begin, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                answer = text[begin:i].strip()
                return answer or None
    return None  # truncated: the box never closes


def _clean(answer: str) -> str | None:
    """Strip what surrounds an answer written in running text: markup, math delimiters, a final period."""
    s = answer.strip()
    changed = True
    while changed and s:
        changed = False
        s = s.rstrip(" .").strip()
        for left, right in _WRAPPERS:
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s, changed = s[len(left):len(s) - len(right)].strip(), True
                break
    return s or None


def _answer_is(text: str) -> str | None:
    last = None
    for last in _ANSWER_IS.finditer(text):
        pass
    return _clean(last.group(1)) if last else None


def _answer_tag(text: str) -> str | None:
    start = text.rfind("<answer>")
    if start < 0:
        return None
    end = text.find("</answer>", start)
    if end < 0:
        return None  # truncated
    return _clean(text[start + len("<answer>"):end])


_FORMS = {"answer_is": _answer_is, "answer_tag": _answer_tag}


def extract_answer(text: str, forms: tuple[str, ...] | list[str] = ()) -> str | None:
    """The final answer: the last `\\boxed{}`; without any box, the first of `forms` that matches."""
    if BOXED in text:
        return extract_boxed(text)
    for form in forms:
        if form not in _FORMS:
            raise ValueError(f"unknown answer form {form!r}; choose from {', '.join(ANSWER_FORMS)}")
        answer = _FORMS[form](text)
        if answer is not None:
            return answer
    return None
