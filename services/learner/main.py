"""The learner service: admits prompts, trains on scored groups, pushes weights, checkpoints.

Accounting (kept in the run's `state` hash, updated in the same transactions as the stream acks):
admitted = trained + dropped_stale + dropped_vote + deadlettered + in flight, where in flight is the
`inflight` hash; dropped_vote counts groups the voter's policy marked not to train (tie, min agreement).
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path

from mmupt import stream_metrics
from mmupt.auth import require_token
from mmupt.config import Settings
from mmupt.data import Item, load_items
from mmupt.images import ImageStore
from mmupt.model import load_processor
from mmupt.service import Service, base_app, consumer_name
from mmupt.streams import Entry, Streams, connect
from mmupt.synth.continual import ContinualSynthesis, start_continual
from mmupt.wire import MalformedMessage, PromptMsg, ScoredMsg, decode, encode

from . import metrics
from .batch import BatchBuilder, BatchError
from .engine import PolicyEngine
from .weight_push import WeightPusher

log = logging.getLogger(__name__)
COUNTERS = ("admitted", "trained", "dropped_stale", "dropped_vote", "duplicates", "deadlettered")


class Learner:
    def __init__(self, settings: Settings, streams: Streams, engine: PolicyEngine, processor,
                 pusher: WeightPusher, items: list[Item], synthetic: ContinualSynthesis | None = None):
        self.cfg = settings
        self.lc = settings.learner
        self.streams = streams
        self.keys = streams.keys
        self.engine = engine
        self.processor = processor
        self.pusher = pusher
        self.items = items
        self.synthetic = synthetic  # continual mode: synthetic prompts mixed in at synth.ratio
        self.images = ImageStore(streams.r, streams.keys, settings.streams.image_ttl_s)
        self.batches = BatchBuilder(settings, processor, self.images)
        self.consumer = consumer_name("learner")
        self.version = 0
        self.buffer: list[tuple[Entry, ScoredMsg]] = []
        self.started = time.monotonic()
        self._order: list[int] = []
        self._last_sync = 0.0

    # ---- state ----------------------------------------------------------------------------------
    def init_state(self) -> None:
        self.streams.r.hset(self.keys.state, mapping={"version": 0, "step": 0, "status": "running", "epoch": 0,
                                                      "cursor": 0, "synthetic": 0, **{c: 0 for c in COUNTERS}})

    def counters(self) -> dict[str, int]:
        state = self.streams.state()
        return {c: int(state.get(c, 0)) for c in COUNTERS} | {"in_flight": self.streams.r.hlen(self.keys.inflight)}

    # ---- admission ------------------------------------------------------------------------------
    def _next_item(self) -> tuple[int, int, Item]:
        state = self.streams.state()
        epoch, cursor = int(state.get("epoch", 0)), int(state.get("cursor", 0))
        if cursor >= len(self.items):
            epoch, cursor = epoch + 1, 0
        if len(self._order) != len(self.items) or cursor == 0:
            self._order = list(range(len(self.items)))
            random.Random(self.cfg.data.shuffle_seed + epoch).shuffle(self._order)
        return epoch, cursor, self.items[self._order[cursor]]

    def _next_prompt(self) -> tuple[str, int, int | None, Item] | None:
        """(group id, epoch, dataset cursor or None for a synthetic prompt, item) of the next prompt: a
        synthetic one when one is due and ready, else the next dataset item; None while synthetic-only waits."""
        if self.synthetic is not None:
            state = self.streams.state()
            if self.synthetic.due(state):
                item = self.synthetic.take()
                if item is not None:
                    return f"synth:{state.get('synthetic', 0)}", int(state.get("epoch", 0)), None, item
                if self.synthetic.only:
                    return None
        epoch, cursor, item = self._next_item()
        return f"{epoch}:{cursor}", epoch, cursor, item

    def admission_room(self) -> int:
        """AReaL-style: in flight <= (max_staleness + 1) * batch; never beyond what max_steps needs."""
        counts = self.counters()
        window = (self.lc.max_staleness + 1) * self.lc.batch_groups - counts["in_flight"]
        remaining = self.lc.max_steps * self.lc.batch_groups - counts["trained"] - counts["in_flight"]
        return max(0, min(window, remaining))

    def admit(self, stop) -> int:
        admitted = 0
        for _ in range(self.admission_room()):
            if not self.streams.wait_for_room("prompts", stop):
                break
            prompt = self._next_prompt()
            if prompt is None:
                break
            group_id, epoch, cursor, item = prompt
            hashes = [self.images.put(data) for data in item.images]
            msg = PromptMsg(group_id=group_id, prompt_id=item.id, epoch=epoch, problem=item.problem,
                            image_hashes=hashes, options=item.options, admitted_version=self.version,
                            hidden_answer=item.answer)
            pipe = self.streams.r.pipeline(transaction=True)
            pipe.xadd(self.keys.prompts, {b"m": encode(msg)})
            pipe.hset(self.keys.inflight, group_id, self.version)
            if cursor is None:
                pipe.hincrby(self.keys.state, "synthetic", 1)
            else:
                pipe.hset(self.keys.state, mapping={"epoch": epoch, "cursor": cursor + 1})
            pipe.hincrby(self.keys.state, "admitted", 1)
            pipe.execute()
            metrics.ADMITTED.inc()
            admitted += 1
        return admitted

    # ---- consumption ----------------------------------------------------------------------------
    def _finish(self, pipe, group_ids: list[str], counter: str) -> None:
        if group_ids:
            pipe.hdel(self.keys.inflight, *group_ids)
            pipe.hincrby(self.keys.state, counter, len(group_ids))

    def collect(self) -> None:
        needed = max(1, self.lc.batch_groups - len(self.buffer))
        started = time.perf_counter()
        entries = self.streams.read("scored", self.consumer, needed, block_ms=500)
        metrics.WAIT_SECONDS.inc(time.perf_counter() - started)
        buffered = {s.group.group_id for _, s in self.buffer}
        for entry in entries:
            try:
                scored = decode(entry.payload or b"", ScoredMsg)
            except MalformedMessage as exc:
                metrics.DEADLETTERED.inc()
                self.streams.dead_letter("scored", entry, str(exc), "learner")
                continue
            gid = scored.group.group_id
            if gid in buffered or not self.streams.r.hexists(self.keys.inflight, gid):
                metrics.DUPLICATES.inc()  # re-delivered, or already trained/dropped
                self.streams.ack("scored", [entry.id], lambda p: p.hincrby(self.keys.state, "duplicates", 1))
                continue
            if scored.vote.drop_reason is not None:  # the voter's policy says not to train it: count it
                self.streams.ack("scored", [entry.id], lambda p: self._finish(p, [gid], "dropped_vote"))
                continue
            buffered.add(gid)
            self.buffer.append((entry, scored))
        self.drop_stale()

    def drop_stale(self) -> None:
        keep, stale = [], []
        for entry, scored in self.buffer:
            lag = self.version - scored.group.policy_version
            (stale if lag > self.lc.max_staleness else keep).append((entry, scored))
        if stale:
            metrics.DROPPED_STALE.inc(len(stale))
            self.streams.ack("scored", [e.id for e, _ in stale],
                             lambda p: self._finish(p, [s.group.group_id for _, s in stale], "dropped_stale"))
        self.buffer = keep

    # ---- training -------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        batch, self.buffer = self.buffer[:self.lc.batch_groups], self.buffer[self.lc.batch_groups:]
        good = []  # (entry, scored, encoded prompt)
        for entry, scored in batch:
            try:
                good.append((entry, scored, self.batches.encode(scored)))
            except BatchError as exc:  # e.g. its images expired: it cannot be trained on
                metrics.DEADLETTERED.inc()
                self.streams.dead_letter("scored", entry, str(exc), "learner", scored.group.group_id)
        if len(good) < self.lc.batch_groups:
            self.buffer = [(e, s) for e, s, _ in good] + self.buffer  # wait for replacements
            return {}
        pad = self.processor.tokenizer.pad_token_id
        micro = [self.batches.build([(s, p) for _, s, p in good[i:i + self.lc.micro_groups]], pad)
                 for i in range(0, len(good), self.lc.micro_groups)]
        stats = self.engine.train_step(micro)
        rewards = [r for _, s, _ in good for r in s.vote.rewards]
        stats["mean_reward"] = sum(rewards) / len(rewards)
        for _, s, _ in good:
            metrics.VERSION_LAG.observe(self.version - s.group.policy_version)
        self.version += 1
        gids = [s.group.group_id for _, s, _ in good]

        def record(pipe):
            self._finish(pipe, gids, "trained")
            pipe.hset(self.keys.state, mapping={"version": self.version, "step": self.version})
            pipe.hincrbyfloat(self.keys.state, "reward_sum", sum(rewards))
            pipe.hincrby(self.keys.state, "reward_count", len(rewards))

        self.streams.ack("scored", [e.id for e, _, _ in good], record)
        self._observe(stats, len(good))
        return stats

    def _observe(self, stats: dict[str, float], groups: int) -> None:
        metrics.VERSION.set(self.version)
        metrics.STEPS.inc()
        metrics.TRAINED.inc(groups)
        metrics.TOKENS.inc(stats["tokens"])
        metrics.REWARD.set(stats["mean_reward"])
        metrics.STEP_SECONDS.observe(stats["step_seconds"])
        for term in ("loss", "pg_loss", "kl"):
            if term in stats:
                metrics.LOSS.labels(term).set(stats[term])
        for stat in ("clip_frac", "dual_clip_frac", "entropy", "grad_norm", "mismatch_kl", "is_weight_mean"):
            if stat in stats:
                metrics.STEP_STAT.labels(stat).set(stats[stat])
        elapsed = time.monotonic() - self.started
        rate = self.version / elapsed
        eta = (self.lc.max_steps - self.version) / rate if rate > 0 else float("inf")
        log.info("step %d/%d loss %.4f reward %.3f kl %.4f | %.2f steps/min, ETA %.0fs", self.version,
                 self.lc.max_steps, stats["loss"], stats["mean_reward"], stats.get("kl", 0.0), rate * 60, eta)

    # ---- weight sync ----------------------------------------------------------------------------
    def live_servers(self) -> dict[str, dict]:
        return self.streams.servers(max_age_s=3 * self.cfg.rollout.heartbeat_s + 5)

    def push(self, only_lagging: bool = False) -> None:
        servers = self.live_servers()
        targets = [info["grpc"] for info in servers.values()
                   if not only_lagging or int(info.get("version", -1)) < self.version]
        if not targets:
            return
        results = self.pusher.push(self.engine.export_state(), self.version, targets)
        for result in results:
            if result.ok:
                # Record at once: a heartbeat may lag, and we must not push the same version twice.
                info = servers.get(result.server) or {}
                self.streams.register_server(result.server, {**info, "version": result.version})

    def sync_lagging(self) -> None:
        """Cold sync: servers that joined late or missed a push get the current version."""
        if time.monotonic() - self._last_sync >= 1.0:
            self._last_sync = time.monotonic()
            if self.version > 0:
                self.push(only_lagging=True)

    # ---- the loop -------------------------------------------------------------------------------
    def run(self, stop) -> None:
        while self.version < self.lc.max_steps and not stop.is_set():
            self.admit(stop)
            self.sync_lagging()
            self.collect()
            if len(self.buffer) >= self.lc.batch_groups and self.train_step():
                self.push()
        if self.version >= self.lc.max_steps:
            self.push(only_lagging=True)
            path = self.save_checkpoint()
            self.streams.r.hset(self.keys.state, mapping={"status": "finished", "checkpoint": str(path)})
            log.info("finished: %d steps, checkpoint %s", self.version, path)

    def save_checkpoint(self) -> Path:
        path = Path(self.lc.checkpoint_dir) / f"step-{self.version:06d}"
        path.mkdir(parents=True, exist_ok=True)
        self.engine.save_hf(path, self.processor)
        return path.resolve()


def run(settings: Settings) -> int:
    if not settings.redis_url:
        raise SystemExit("the learner needs redis_url (config) or MMUPT_REDIS_URL")
    token = require_token(settings.auth)
    service = Service("learner")
    streams = Streams(connect(settings.redis_url), settings.run_id, settings.streams)
    streams.ensure_groups()
    stream_metrics.register(streams)
    items = load_items(settings.data.train, settings.data, settings.streams)
    processor = load_processor(settings.model)
    engine = PolicyEngine(settings.model, settings.learner, settings.rollout.temperature)
    pusher = WeightPusher(token, settings.run_id, settings.learner.push_chunk_bytes, settings.learner.push_timeout_s)
    synthetic = start_continual(settings, items, streams, service)
    learner = Learner(settings, streams, engine, processor, pusher, items, synthetic)
    learner.init_state()

    app = base_app("mmupt learner", ready=lambda: True)

    @app.get("/v1/status")
    def status():
        synthesis = {"synthesis": synthetic.report.as_dict()} if synthetic else {}
        return {"version": learner.version, "max_steps": settings.learner.max_steps, **streams.state(),
                **learner.counters(), **synthesis}

    service.serve_http(app, settings.learner.host, settings.learner.http_port)

    service.task("train", lambda: learner.run(service.stop))
    def on_stop() -> None:
        pusher.close()
        if synthetic is not None:
            synthetic.close()

    return service.run_until_stopped(on_stop)
