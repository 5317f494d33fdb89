"""The prompts that ask a model for new questions, and the parser that reads its reply.

Two modes (the paper's): *in-context* shows the image, a seed question and its answer and asks for a
new, different question about the same image; *direct* shows the image alone. Either way the reply
must give the question after a marker, so that a model that rambles or answers its own question can
be told apart from one that wrote a question.
"""
from __future__ import annotations

import re
import unicodedata

from mmupt.config import PromptSettings
from mmupt.data import Item
from mmupt.eval import EvalItem, item_messages, problem_text
from mmupt.sampler import image_part

MODES = ("in-context", "direct")
# "Question:" or "New question:", optionally in markdown bold; the last one in the reply counts.
MARKER = re.compile(r"(?:\*\*)?\s*\b(?:new\s+)?question\s*(?:\*\*)?\s*:\s*(?:\*\*)?", re.IGNORECASE)
# Where a reply stops asking and starts answering or explaining.
TAIL = re.compile(r"(?:\n|(?<=[?.!])\s)\s*(?:\*\*)?\s*(?:answer|final answer|solution|explanation|reasoning)\s*(?:\*\*)?\s*:",
                  re.IGNORECASE)
PARAGRAPH = re.compile(r"\n\s*\n")
IMAGE_TAG = re.compile(r"<image\d*>", re.IGNORECASE)

DIRECT = (
    "Look at the image and write one new question about it. The question must need the image to be "
    "answered, and it must have one short final answer that can be checked, such as a number, a word "
    "or a short expression. Reply with the question only, on one line that starts with \"Question:\". "
    "Do not answer it."
)
IN_CONTEXT = (
    "Here is a question about the image, with its answer.\n"
    "Question: {question}\n"
    "Answer: {answer}\n"
    "Write one new question about the same image that is different from the one above: ask about "
    "something else in the image, or ask for different reasoning. The new question must need the image "
    "to be answered, and it must have one short final answer that can be checked, such as a number, a "
    "word or a short expression. Reply with the new question only, on one line that starts with "
    "\"New question:\". Do not answer it."
)
NO_ANSWER = "(not given)"


def plain_question(problem: str) -> str:
    """A problem's text without its image placeholders."""
    return IMAGE_TAG.sub("", problem).strip()


def seed_question(seed: Item) -> str:
    """The seed's question as a reader sees it: placeholders removed, choices listed."""
    return problem_text(EvalItem(id=seed.id, question=plain_question(seed.problem), answer="", options=seed.options))


def synthesis_messages(mode: str, seed: Item) -> list[dict]:
    """OpenAI-style messages asking for one new question about the seed's images."""
    if mode == "direct":
        text = DIRECT
    elif mode == "in-context":
        text = IN_CONTEXT.format(question=seed_question(seed), answer=seed.answer or NO_ANSWER)
    else:
        raise ValueError(f"unknown synthesis mode {mode!r}; choose one of {MODES}")
    return [{"role": "user", "content": [*(image_part(data) for data in seed.images), {"type": "text", "text": text}]}]


def answer_messages(question: str, images: list[bytes], prompt: PromptSettings) -> list[dict]:
    """The training prompt (question, the paper's suffix) with the images, or text only without them."""
    problem = "".join("<image>" for _ in images) + question
    return item_messages(EvalItem(id="", question=problem, answer="", images=list(images)), prompt)


def _clean(text: str) -> str:
    """Placeholders and control characters out, markdown emphasis and quotes off the ends."""
    text = IMAGE_TAG.sub("", text)
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    return text.strip().strip("*").strip().strip("\"'`").strip()


def parse_question(reply: str, require_marker: bool = True) -> tuple[str | None, str]:
    """(question, "") from a model's reply, or (None, why) when it holds no usable question.

    With `require_marker`, the question is the text after the last marker up to an answer, an
    explanation or a blank line (so choices on the next lines stay), and text with broken characters (U+FFFD, control characters) is refused; without
    it, the whole reply is taken, cleaned.
    """
    if not require_marker:
        question = _clean(reply)
        return (question, "") if question else (None, "empty reply")
    if "\ufffd" in reply:
        return None, "broken characters (U+FFFD) in the reply"
    if any(unicodedata.category(ch) == "Cc" and ch not in "\n\t\r" for ch in reply):
        return None, "control characters in the reply"
    markers = list(MARKER.finditer(reply))
    if not markers:
        return None, "no \"Question:\" marker"
    question = TAIL.split(reply[markers[-1].end():], maxsplit=1)[0]
    question = _clean(PARAGRAPH.split(question.strip(), maxsplit=1)[0])  # a blank line ends it: commentary follows
    if not question:
        return None, "nothing after the marker"
    return question, ""
