"""Continual mode: synthetic prompts generated on the fly for the learner, mixed in at a ratio.

`ContinualSynthesis.step` (run in a loop on a learner thread) takes the next few training images as
seeds, asks a live rollout server (its `/v1/chat/completions`, found through the servers'
registrations in Redis) for new questions, filters them exactly as `mmupt synth` does, and queues the
kept ones, at most `synth.ready_prompts`. The learner asks `due(state)` whether the next prompt should
be synthetic (so that `synthetic <= ratio * admitted`) and takes one with `take()` when one is ready;
when none is, it admits a dataset item instead (training never waits for synthesis), except with
ratio 1, where it waits. Synthetic prompts carry no hidden answer.
"""
from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable

from mmupt.config import Settings
from mmupt.data import Item
from mmupt.sampler import HTTPSampler

from .pipeline import Candidate, Synthesizer, problem_for
from .report import SynthReport

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 30.0


class ContinualSynthesis:
    def __init__(self, settings: Settings, seeds: list[Item], server_urls: Callable[[], list[str]], grader):
        # Unseeded: a seeded request would reseed the rollout server's generator, training rollouts included.
        self.settings = settings.model_copy(update={"synth": settings.synth.model_copy(update={"seed": None})})
        self.cfg = self.settings.synth
        self.seeds = [s for s in seeds if s.images]
        if not self.seeds:
            raise ValueError("continual synthesis needs training items with images to use as seeds")
        self.server_urls = server_urls
        self.grader = grader
        self.synthesizer = Synthesizer(self.settings, grader)
        self.synthesizer.remember_seeds(self.seeds)
        self.report = SynthReport(self.cfg.mode, "rollout servers")
        self.ready: queue.Queue[Item] = queue.Queue(maxsize=self.cfg.ready_prompts)
        self._order = list(range(len(self.seeds)))
        self._cursor = 0
        self._cycles = 0
        self._made = 0
        self._turn = 0
        self._samplers: dict[str, HTTPSampler] = {}
        self._last_log = time.monotonic()

    # ---- the learner's side ----------------------------------------------------------------------
    @property
    def only(self) -> bool:
        """Synthetic prompts only: admission waits for them rather than fall back to the data set."""
        return self.cfg.ratio >= 1.0

    def due(self, state: dict) -> bool:
        """Whether the next admitted prompt should be synthetic (from the learner's state counters)."""
        synthetic, admitted = int(state.get("synthetic", 0)), int(state.get("admitted", 0))
        return synthetic < self.cfg.ratio * (admitted + 1)

    def take(self) -> Item | None:
        try:
            return self.ready.get_nowait()
        except queue.Empty:
            return None

    # ---- generation (a learner thread) -----------------------------------------------------------
    def _next_seeds(self) -> list[Item]:
        batch = []
        for _ in range(min(self.cfg.seeds_per_batch, len(self.seeds))):
            if self._cursor == 0:  # a new pass over the images, in a new order
                random.Random(f"synth:{self.settings.data.shuffle_seed}:{self._cycles}").shuffle(self._order)
                self._cycles += 1
            batch.append(self.seeds[self._order[self._cursor]])
            self._cursor = (self._cursor + 1) % len(self.seeds)
        return batch

    def _sampler(self, stop: threading.Event) -> HTTPSampler | None:
        urls = self.server_urls()
        if not urls:
            stop.wait(1.0)
            return None
        url = urls[self._turn % len(urls)]
        self._turn += 1
        if url not in self._samplers:
            self._samplers[url] = HTTPSampler(url, busy_wait_s=60.0)
        return self._samplers[url]

    def _item(self, candidate: Candidate) -> Item:
        self._made += 1
        seed = candidate.seed
        return Item(id=f"synth-{self._made}-{seed.id}", problem=problem_for(candidate.question, len(seed.images)),
                    images=seed.images, answer=None)

    def step(self, stop: threading.Event) -> int:
        """One batch of seeds: generate, filter, queue the kept prompts (waiting for room). Returns
        how many were queued."""
        if self.ready.full():
            stop.wait(0.5)
            return 0
        sampler = self._sampler(stop)
        if sampler is None:
            return 0
        seeds = self._next_seeds()
        candidates, failures = self.synthesizer.run(sampler, seeds)
        self.report.add(len(seeds), candidates, failures)
        queued = 0
        for candidate in candidates:
            if not candidate.kept:
                continue
            item = self._item(candidate)
            while not stop.is_set():
                try:
                    self.ready.put(item, timeout=0.5)
                    queued += 1
                    break
                except queue.Full:
                    continue
        self._progress()
        return queued

    def _progress(self) -> None:
        if time.monotonic() - self._last_log >= PROGRESS_EVERY_S:
            self._last_log = time.monotonic()
            log.info("continual synthesis: %s; %d ready", self.report.line(), self.ready.qsize())

    def close(self) -> None:
        for sampler in self._samplers.values():
            sampler.close()
        self.grader.close()


def live_rollout_urls(streams, heartbeat_s: float) -> Callable[[], list[str]]:
    """The HTTP addresses of the rollout servers registered in this run (live heartbeats only)."""
    def urls() -> list[str]:
        servers = streams.servers(max_age_s=3 * heartbeat_s + 5)
        return sorted(f"http://{info['http']}" for info in servers.values() if info.get("http"))
    return urls


def start_continual(settings: Settings, items: list[Item], streams, service) -> ContinualSynthesis | None:
    """The learner's continual mode, when `synth.ratio` > 0: generation runs as a loop of `service`
    (errors logged and retried) until it stops."""
    if settings.synth.ratio <= 0:
        return None
    from mmupt.services.voter.main import grader_for  # noqa: PLC0415

    synthesis = ContinualSynthesis(settings, items, live_rollout_urls(streams, settings.rollout.heartbeat_s),
                                   grader_for(settings.voter))
    service.loop("synthesis", lambda: synthesis.step(service.stop))
    log.info("continual mode: %.0f%% of prompts synthetic (%s synthesizing) through the rollout servers' API",
             100 * settings.synth.ratio, settings.synth.mode)
    return synthesis
