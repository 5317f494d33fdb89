"""Helpers for the learner tests: a feeder that plays rollout and voter with the real components.

The feeder takes the prompts the learner admits, samples each group with the real rollout worker
(the tiny model, a fixed seed, so every run sees the same groups), and scores it with a fixed rule
instead of a vote: the random tiny model boxes no answers, so a majority vote would give every
group zero advantage.
"""
from __future__ import annotations

import threading
import time

from mmupt.streams import Streams, connect
from mmupt.wire import PromptMsg, ScoredMsg, Vote, decode, encode


def alternating_rewards(group) -> list[float]:
    return [1.0 if i % 2 == 0 else 0.0 for i in range(len(group.responses))]


def score(group, rewards: list[float]) -> ScoredMsg:
    vote = Vote(rewards=rewards, answers=[None] * len(rewards), pseudo_label=None, majority_ratio=0.5,
                vote_entropy=1.0, no_answer_rate=1.0, unanimous=False, reward_mode="test-rule")
    return ScoredMsg(group=group, vote=vote)


class Feeder:
    """Rollout + scoring in a thread: answers up to `allowed` admitted prompts, in admission order."""

    def __init__(self, settings, rewards=alternating_rewards):
        from mmupt.services.rollout.hf_backend import TransformersBackend
        from mmupt.services.rollout.main import RolloutWorker

        settings = settings.model_copy(deep=True)
        settings.rollout.seed = 1234  # the same groups in every run
        self.streams = Streams(connect(settings.redis_url), settings.run_id, settings.streams)
        self.streams.ensure_groups()
        self.worker = RolloutWorker(settings, self.streams, TransformersBackend(settings.model), "feeder")
        self.rewards = rewards
        self.allowed = 10**9
        self.fed = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=30)

    def _loop(self) -> None:
        while not self.stop.is_set():
            if self.fed >= self.allowed:
                time.sleep(0.02)
                continue
            for entry in self.streams.read("prompts", "feeder", 1, block_ms=100):
                group = self.worker.sample(decode(entry.payload, PromptMsg))
                scored = score(group, self.rewards(group))
                self.streams.append_and_ack("scored", [encode(scored)], "prompts", [entry.id])
                self.fed += 1


def wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def learner_settings(tiny_model_dir, shapes_dir, redis_url, run_id, checkpoint_dir, **learner):
    """Settings for learner tests: groups of 4, two groups per step, no stale drops unless asked."""
    from mmupt.config import load_settings

    options = {"batch_groups": 2, "micro_groups": 1, "max_steps": 4, "lr": 1e-3, "max_staleness": 100,
               "checkpoint_every": 2, "keep_checkpoints": 2, "checkpoint_dir": str(checkpoint_dir)}
    return load_settings(environ={}, overrides={
        "run_id": run_id, "redis_url": redis_url,
        "model": {"path": str(tiny_model_dir), "device": "cpu"},
        "data": {"train": str(shapes_dir / "train.jsonl"), "eval": str(shapes_dir / "test.jsonl")},
        "rollout": {"group_size": 4, "max_new_tokens": 8},
        "learner": options | learner,
        "auth": {"token": "test-token"},
    })


def make_learner(settings, synthetic=None):
    """A real learner: DeepSpeed engine, Redis streams, the tiny model (one rank)."""
    from mmupt.data import load_jsonl
    from mmupt.model import load_processor
    from mmupt.services.learner.engine import PolicyEngine
    from mmupt.services.learner.main import Learner
    from mmupt.services.learner.weight_push import WeightPusher

    streams = Streams(connect(settings.redis_url), settings.run_id, settings.streams)
    streams.ensure_groups()
    engine = PolicyEngine(settings.model, settings.learner, settings.rollout.temperature)
    pusher = WeightPusher("test-token", settings.run_id, settings.learner.push_chunk_bytes, 10)
    return Learner(settings, streams, engine, load_processor(settings.model), pusher, load_jsonl(settings.data.train),
                   synthetic)


def run_learner(settings, resume: bool = False, feeder: Feeder | None = None):
    """Train to max_steps with a feeder; returns the learner."""
    learner = make_learner(settings)
    learner.start(resume)
    if feeder is not None:
        learner.run(threading.Event())
        return learner
    with Feeder(settings):
        learner.run(threading.Event())
    return learner


def sample_groups(settings, count: int, rewards=alternating_rewards):
    """`count` scored groups sampled by the real rollout worker, with their image bytes."""
    from mmupt.data import load_jsonl
    from mmupt.images import ImageStore
    from mmupt.services.rollout.hf_backend import TransformersBackend
    from mmupt.services.rollout.main import RolloutWorker

    settings = settings.model_copy(deep=True)
    settings.rollout.seed = 1234
    streams = Streams(connect(settings.redis_url), settings.run_id, settings.streams)
    images = ImageStore(streams.r, streams.keys, settings.streams.image_ttl_s)
    worker = RolloutWorker(settings, streams, TransformersBackend(settings.model), "sampler")
    out = []
    for i, item in enumerate(load_jsonl(settings.data.train)[:count]):
        prompt = PromptMsg(group_id=f"0:{i}", prompt_id=item.id, problem=item.problem,
                           image_hashes=[images.put(data) for data in item.images])
        group = worker.sample(prompt)
        out.append((score(group, rewards(group)), list(item.images)))
    return out
