"""Final-answer extraction from a response."""
from __future__ import annotations

BOXED = "\\boxed{"


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
