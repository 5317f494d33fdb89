"""Synthesise questions for seed images and filter them (the core of `mmupt synth` and of the
learner's continual mode).

For a batch of seeds: ask the model for `questions_per_seed` questions per seed (one prompt, n
samples), parse each reply, drop the too short and too long and the duplicates (of the seed's
question or of an earlier question about the same image), then sample G answers to each remaining
question with the training prompt and keep it only if the majority is strong enough
(self-consistency), and finally sample G answers without the image and drop the question if the
model reaches the same answer just as consistently without looking. Every generated question ends
as one `Candidate`, kept or dropped with a reason (filters.REASONS).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

from mmupt.config import Settings
from mmupt.data import Item
from mmupt.sampler import ChatRequest, Choice, Sampler, SamplerError
from mmupt.services.voter.grading import Grader
from mmupt.services.voter.vote import VotePolicy, vote
from mmupt.wire import Vote

from .filters import Deduper, answerability_verdict, image_verdict, length_verdict
from .prompts import MODES, answer_messages, parse_question, plain_question, synthesis_messages

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One generated question and what the filters made of it."""
    seed: Item
    index: int                          # which of the seed's samples
    reply: str                          # the model's reply, as written
    question: str | None = None         # parsed from the reply
    reason: str | None = None           # why it was dropped (filters.REASONS); None: kept
    detail: str = ""
    checks: list[str] = field(default_factory=list)   # the filters that looked at it
    majority_share: float | None = None  # with the image (self-consistency)
    majority_answer: str | None = None
    blind_share: float | None = None     # without the image

    @property
    def kept(self) -> bool:
        return self.reason is None

    def drop(self, verdict: tuple[str, str] | None) -> bool:
        if verdict is not None:
            self.reason, self.detail = verdict
        return verdict is not None


@dataclass(frozen=True)
class SeedFailure:
    seed_id: str
    reason: str


def image_key(images: list[bytes]) -> str:
    """The identity of a set of images: questions are deduplicated per image."""
    digest = hashlib.sha256()
    for data in images:
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


def problem_for(question: str, n_images: int) -> str:
    """The training format's problem: one <image> placeholder per image, then the question."""
    return "<image>" * n_images + question


class Synthesizer:
    """Generates and filters questions; remembers what it has seen, for deduplication across batches."""

    def __init__(self, settings: Settings, grader: Grader, mode: str | None = None):
        self.settings = settings
        self.cfg = settings.synth
        self.mode = mode or self.cfg.mode
        if self.mode not in MODES:
            raise ValueError(f"unknown synthesis mode {self.mode!r}; choose one of {MODES}")
        self.grader = grader
        self.answer_samples = self.cfg.answer_samples or settings.rollout.group_size
        self.policy = VotePolicy(answer_forms=tuple(settings.voter.extra_answer_forms))
        self.dedup = Deduper(self.cfg.near_duplicate_similarity)
        self._requests = 0
        self._seen_seeds: set[str] = set()

    # ---- sampling ----------------------------------------------------------------------------------
    def _seed(self) -> int | None:
        self._requests += 1
        return None if self.cfg.seed is None else self.cfg.seed + self._requests

    def _sample(self, sampler: Sampler, requests: list[ChatRequest]) -> list[list[Choice] | str]:
        """Choices per request, or the message of a request the model refused (asked alone, so that
        one refusal does not lose the rest of its batch)."""
        out: list[list[Choice] | str] = []
        step = self.cfg.seeds_per_batch
        for start in range(0, len(requests), step):
            chunk = requests[start:start + step]
            try:
                out += sampler.complete(chunk)
                continue
            except SamplerError:
                pass
            for request in chunk:
                try:
                    out += sampler.complete([request])
                except SamplerError as exc:
                    out.append(str(exc))
        return out

    def _answers(self, sampler: Sampler, candidates: list[Candidate], with_image: bool) -> list[Vote | str]:
        r = self.settings.rollout
        requests = [ChatRequest(messages=answer_messages(c.question, c.seed.images if with_image else [],
                                                         self.settings.prompt),
                                n=self.answer_samples, temperature=r.temperature, top_p=r.top_p,
                                max_tokens=r.max_new_tokens, seed=self._seed()) for c in candidates]
        return [result if isinstance(result, str) else
                vote([choice.text for choice in result], self.grader, "majority", policy=self.policy)
                for result in self._sample(sampler, requests)]

    # ---- the pipeline ------------------------------------------------------------------------------
    def remember_seeds(self, seeds: list[Item]) -> None:
        """Seed questions count as known for their images (duplicates of the seed are dropped)."""
        for seed in seeds:
            if seed.id not in self._seen_seeds:
                self._seen_seeds.add(seed.id)
                self.dedup.add_seed(image_key(seed.images), plain_question(seed.problem))

    def run(self, sampler: Sampler, seeds: list[Item]) -> tuple[list[Candidate], list[SeedFailure]]:
        """Generate and filter questions for `seeds`; every generated question comes back once."""
        self.remember_seeds(seeds)
        failures = [SeedFailure(s.id, "the seed has no image") for s in seeds if not s.images]
        seeds = [s for s in seeds if s.images]
        candidates = self._generate(sampler, seeds, failures)
        survivors = [c for c in candidates if self._text_filters(c)]
        self._answer_filters(sampler, survivors)
        return candidates, failures

    def _generate(self, sampler: Sampler, seeds: list[Item], failures: list[SeedFailure]) -> list[Candidate]:
        c = self.cfg
        requests = [ChatRequest(messages=synthesis_messages(self.mode, seed), n=c.questions_per_seed,
                                temperature=c.temperature, top_p=c.top_p, max_tokens=c.max_tokens, seed=self._seed())
                    for seed in seeds]
        candidates = []
        for seed, result in zip(seeds, self._sample(sampler, requests)):
            if isinstance(result, str):
                failures.append(SeedFailure(seed.id, result))
                continue
            candidates += [Candidate(seed, i, choice.text) for i, choice in enumerate(result)]
        return candidates

    def _text_filters(self, candidate: Candidate) -> bool:
        c = self.cfg
        candidate.checks.append("parse")
        candidate.question, why = parse_question(candidate.reply, c.require_marker)
        if candidate.drop(("unparseable", why) if candidate.question is None else None):
            return False
        candidate.checks.append("length")
        if candidate.drop(length_verdict(candidate.question, c.min_words, c.max_words)):
            return False
        if c.dedup:
            candidate.checks.append("dedup")
            key = image_key(candidate.seed.images)
            if candidate.drop(self.dedup.verdict(key, candidate.question)):
                return False
            self.dedup.add(key, candidate.question)
        return True

    def _answer_filters(self, sampler: Sampler, candidates: list[Candidate]) -> None:
        c = self.cfg
        if not candidates or not (c.min_majority_share > 0 or c.drop_unanimous or c.image_check):
            return  # no filter needs answers
        consistent = []
        for candidate, result in zip(candidates, self._answers(sampler, candidates, with_image=True)):
            candidate.checks.append("answerability")
            if isinstance(result, str):
                candidate.drop(("sampling_error", result))
                continue
            candidate.majority_share, candidate.majority_answer = result.majority_ratio, result.pseudo_label
            if not candidate.drop(answerability_verdict(result, c.min_majority_share, c.drop_unanimous)):
                consistent.append((candidate, result))
        if not c.image_check or not consistent:
            return
        blind = self._answers(sampler, [candidate for candidate, _ in consistent], with_image=False)
        for (candidate, with_image), without in zip(consistent, blind):
            candidate.checks.append("image")
            if isinstance(without, str):
                candidate.drop(("sampling_error", without))
                continue
            candidate.blind_share = without.majority_ratio
            candidate.drop(image_verdict(with_image, without, self.grader.equal, c.image_margin))
