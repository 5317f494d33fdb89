"""The filters that decide which synthesised questions are kept: pure decisions on text and votes.

Each returns None to keep a question, or (reason, detail) to drop it; the reasons are the report's
counters (`REASONS`, in the order the pipeline applies them: cheap text checks first, then the checks
that sample answers from the model).
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

from mmupt.wire import Vote

REASONS = ("unparseable", "too_short", "too_long", "duplicate_of_seed", "duplicate", "sampling_error",
           "unanswerable", "unanimous", "no_image_needed")
Verdict = tuple[str, str] | None

# Words that carry no content for telling questions apart: articles, forms of "to be", prepositions,
# pronouns, and the ways of saying "in the image".
STOPWORDS = frozenset("""
a an the is are was were be been being am do does did of in on at to for from by with as and or
this that these those there here it its it's they them their we you your i me my
image picture figure photo diagram shown show shows depicted displayed given above below please
""".split())
SENTENCE_PUNCTUATION = re.compile(r"[.,;:!?\"'`“”‘’()\[\]]")
TOKEN = re.compile(r"[^\W_]+|[^\w\s]")


def normalize(text: str) -> str:
    """Case, Unicode forms, sentence punctuation and spacing do not make a question new. Maths
    symbols stay: `3+4` and `3-4` are different questions."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(SENTENCE_PUNCTUATION.sub(" ", text).split())


def content_words(text: str) -> frozenset[str]:
    return frozenset(t for t in TOKEN.findall(normalize(text)) if t not in STOPWORDS)


def similarity(a: frozenset[str], b: frozenset[str]) -> float:
    """Jaccard similarity of two content-word sets."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def length_verdict(question: str, min_words: int, max_words: int) -> Verdict:
    words = len(question.split())
    if min_words and words < min_words:
        return "too_short", f"{words} words, fewer than {min_words}"
    if max_words and words > max_words:
        return "too_long", f"{words} words, more than {max_words}"
    return None


@dataclass
class _Known:
    normalized: str
    words: frozenset[str]
    text: str


@dataclass
class Deduper:
    """Questions already known per image (its seeds' questions and the questions kept so far).

    Questions are compared only with those about the same image(s): "How many shapes are there?"
    is a new training item for every new image.
    """
    threshold: float
    _seeds: dict[str, list[_Known]] = field(default_factory=dict)
    _kept: dict[str, list[_Known]] = field(default_factory=dict)

    @staticmethod
    def _known(text: str) -> _Known:
        return _Known(normalize(text), content_words(text), text)

    def add_seed(self, image_key: str, question: str) -> None:
        self._seeds.setdefault(image_key, []).append(self._known(question))

    def add(self, image_key: str, question: str) -> None:
        self._kept.setdefault(image_key, []).append(self._known(question))

    def verdict(self, image_key: str, question: str) -> Verdict:
        new = self._known(question)
        for reason, known in (("duplicate_of_seed", self._seeds.get(image_key, [])),
                              ("duplicate", self._kept.get(image_key, []))):
            for old in known:
                if new.normalized == old.normalized:
                    return reason, f"same text as {old.text[:80]!r}"
                score = similarity(new.words, old.words)
                if score >= self.threshold:
                    return reason, f"similarity {score:.2f} to {old.text[:80]!r}"
        return None


def answerability_verdict(vote: Vote, min_share: float, drop_unanimous: bool) -> Verdict:
    """Self-consistency: the majority of G answers must hold at least `min_share` of them."""
    if vote.majority_ratio < min_share:
        return "unanswerable", (f"majority share {vote.majority_ratio:.2f} < {min_share:g} "
                                f"(no answer in {vote.no_answer_rate:.0%} of the samples)")
    if drop_unanimous and vote.unanimous:
        return "unanimous", f"all samples answer {vote.pseudo_label!r}"
    return None


def image_verdict(with_image: Vote, without_image: Vote, same_answer, margin: float) -> Verdict:
    """A question that does not need its image: without the image the model reaches the same
    majority answer, at least as consistently (less `margin`). `same_answer(a, b)` is the grader."""
    if with_image.pseudo_label is None or without_image.pseudo_label is None:
        return None
    if without_image.majority_ratio < with_image.majority_ratio - margin:
        return None
    if not same_answer(without_image.pseudo_label, with_image.pseudo_label):
        return None
    return "no_image_needed", (f"answered {without_image.pseudo_label!r} without the image "
                               f"(share {without_image.majority_ratio:.2f}, with it {with_image.majority_ratio:.2f})")
