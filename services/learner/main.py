"""The learner service: admits prompts, trains on scored groups, pushes weights, checkpoints.

Rank 0 does everything that talks to Redis and to the rollout servers; with several ranks (the
`deepspeed` launcher) the others follow it in lockstep (ranks.py). The ledger (ledger.py) keeps the
run's account in Redis consistent with the checkpoints, so `--resume` continues exactly:
admitted = trained + dropped_stale + dropped_vote + skipped_zero_advantage + deadlettered + in flight;
dropped_vote counts groups the voter's policy marked not to train (tie, min agreement).
"""
from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

import torch.distributed as dist

from mmupt import stream_metrics
from mmupt.auth import require_token
from mmupt.config import LearnerSettings, Settings
from mmupt.data import Item, load_items
from mmupt.images import ImageError, ImageStore
from mmupt.model import load_processor
from mmupt.service import Service, base_app
from mmupt.streams import Entry, Streams, connect
from mmupt.synth.continual import ContinualSynthesis, start_continual
from mmupt.wire import PAYLOAD_FIELD, MalformedMessage, PromptMsg, ScoredMsg, decode, encode

from . import metrics
from .batch import BatchBuilder, BatchError, rank_share
from .checkpoint import Checkpoints, read_state
from .engine import PolicyEngine
from .grpo import zero_advantage
from .ledger import REPLAYED_ID, Ledger, LedgerMismatch, commit_from_json, commit_to_json
from .ranks import Lockstep
from .train_log import TrainLog
from .weight_push import make_pusher

log = logging.getLogger(__name__)
SYNTHETIC_PREFIX = "synth:"  # group ids of synthetic prompts (dataset prompts are "epoch:cursor")


class Learner:
    def __init__(self, settings: Settings, streams: Streams, engine: PolicyEngine, processor,
                 pusher: WeightPusher, items: list[Item], synthetic: ContinualSynthesis | None = None,
                 lockstep: Lockstep | None = None):
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
        self.batches = BatchBuilder(settings, processor)
        self.lockstep = lockstep or Lockstep(rank_operations(engine, self.batches, processor, self.lc))
        self.ledger = Ledger(streams)
        self.checkpoints = Checkpoints(self.lc.checkpoint_dir, self.lc.keep_checkpoints)
        self.train_log = TrainLog(Path(self.lc.checkpoint_dir) / "train_log.jsonl")
        # One learner per run: a fixed name lets a restarted learner find its own unacked entries.
        self.consumer = os.environ.get("MMUPT_CONSUMER_NAME") or "learner"
        self.rollout_groups = self.lc.batch_groups * self.lc.updates_per_batch
        self.step = 0          # optimizer steps taken
        self.version = 0       # label of the policy last published (one per rollout batch)
        self.saved_step = -1   # step of the newest checkpoint (-1: none)
        self.buffer: list[tuple[Entry, ScoredMsg]] = []
        self.started = time.monotonic()
        self.steps_this_run = 0
        self._orders: dict[int, list[int]] = {}
        self._last_sync = 0.0
        self._taken_over = False
        self._waited = 0.0     # seconds spent waiting for scored groups since the last step

    # ---- start and resume -----------------------------------------------------------------------
    def start(self, resume: bool = False) -> None:
        """Fresh, or continue from the newest checkpoint with the Redis ledger brought in line."""
        checkpoint = self.checkpoints.latest()
        if checkpoint is not None and not resume:
            raise LedgerMismatch(f"{self.checkpoints.root} already holds checkpoints ({checkpoint.name}): continue "
                                 "that run with `mmupt learner --resume`, or use another learner.checkpoint_dir")
        saved = read_state(checkpoint) if checkpoint else None
        if saved and self.ledger.exists() and saved["run_id"] != self.cfg.run_id:
            raise LedgerMismatch(f"the checkpoint {checkpoint} belongs to run {saved['run_id']!r}, but Redis already "
                                 f"has a ledger for run {self.cfg.run_id!r}")
        if not self.ledger.exists():
            if saved:  # Redis lost the run (or is a new one): rebuild the ledger from the checkpoint
                self.ledger.restore(saved["ledger"])
                self.readmit(saved["ledger"]["inflight"])
            else:
                self.ledger.init()
        elif resume:
            self.ledger.reconcile(saved["step"] if saved else 0, commit_from_json(saved["commit"]) if saved else None)
        elif self.ledger.counters()["admitted"]:
            raise LedgerMismatch(f"run {self.cfg.run_id!r} already has a learner ledger in Redis: continue it with "
                                 "`mmupt learner --resume`, or start a new run_id")
        else:
            self.ledger.init()
        if checkpoint:
            self.lockstep.call("load_checkpoint", path=str(checkpoint))
            self.step, self.saved_step = saved["step"], saved["step"]
        version = saved["version"] if saved else 0
        published = self.streams.state_int("version")
        # Rollout servers refuse versions older than what they serve. Weights published after the
        # checkpoint died with the old learner, so the checkpoint's weights go out under a new label.
        self.version = published + 1 if published > version else version
        self.streams.r.hset(self.keys.state, mapping={"version": self.version, "step": self.step, "status": "running"})
        replay = [(Entry(REPLAYED_ID, payload, True), decode(payload, ScoredMsg)) for payload in self.ledger.replay()]
        self.buffer = [(e, s) for e, s in replay if self.ledger.in_flight(s.group.group_id)]  # not dead-lettered since
        self.train_log.truncate(self.step)
        metrics.STEP.set(self.step)
        metrics.VERSION.set(self.version)
        log.info("learner at step %d, version %d%s; %d groups to retrain", self.step, self.version,
                 f" (resumed from {checkpoint})" if checkpoint else "", len(self.buffer))

    def readmit(self, inflight: dict[str, int]) -> None:
        """Admit again the prompts a checkpoint had in flight (their entries died with Redis).

        A dataset prompt's group id "epoch:cursor" names its item. A synthetic prompt ("synth:n") was
        generated on the fly and kept nowhere else: it is dead-lettered with that reason, so the account
        still adds up and the loss is explained.
        """
        synthetic = sorted(g for g in inflight if g.startswith(SYNTHETIC_PREFIX))
        for group_id in synthetic:
            pipe = self.streams.r.pipeline(transaction=True)
            pipe.xadd(self.keys.deadletter, {b"stream": b"prompts", b"entry_id": b"", b"group_id": group_id.encode(),
                                             b"service": b"learner", b"time": str(time.time()).encode(),
                                             b"reason": b"synthetic prompt lost with Redis: it cannot be rebuilt"})
            pipe.hincrby(self.keys.state, "deadlettered", 1)
            pipe.execute()

        def position(group_id: str) -> tuple[int, int]:
            epoch, cursor = group_id.split(":")
            return int(epoch), int(cursor)

        for group_id in sorted(set(inflight) - set(synthetic), key=position):  # in their first admission order
            epoch, cursor = position(group_id)
            self._publish_prompt(group_id, epoch, self._item(epoch, cursor), inflight[group_id])

    # ---- admission ------------------------------------------------------------------------------
    def _item(self, epoch: int, cursor: int) -> Item:
        """The data order is a pure function of (shuffle_seed, epoch): group id "epoch:cursor" names an item."""
        if epoch not in self._orders:
            order = list(range(len(self.items)))
            random.Random(self.cfg.data.shuffle_seed + epoch).shuffle(order)
            self._orders = {epoch: order}
        return self.items[self._orders[epoch][cursor]]

    def _next_item(self) -> tuple[int, int, Item]:
        state = self.streams.state()
        epoch, cursor = int(state.get("epoch", 0)), int(state.get("cursor", 0))
        if cursor >= len(self.items):
            epoch, cursor = epoch + 1, 0
        return epoch, cursor, self._item(epoch, cursor)

    def _next_prompt(self) -> tuple[str, int, int | None, Item] | None:
        """(group id, epoch, dataset cursor or None for a synthetic prompt, item) of the next prompt: a
        synthetic one when one is due and ready, else the next dataset item; None while synthetic-only waits."""
        if self.synthetic is not None:
            state = self.streams.state()
            if self.synthetic.due(state):
                item = self.synthetic.take()
                if item is not None:
                    return f"{SYNTHETIC_PREFIX}{state.get('synthetic', 0)}", int(state.get("epoch", 0)), None, item
                if self.synthetic.only:
                    return None
        epoch, cursor, item = self._next_item()
        return f"{epoch}:{cursor}", epoch, cursor, item

    def admission_room(self) -> int:
        """AReaL-style: untrained groups in flight <= (max_staleness + 1) rollout batches; never beyond
        what max_steps needs; never more than the prompts stream has room for (admission never blocks).

        Synchronous mode (`async: false`) bounds staleness at 0: one rollout batch at a time, and the
        next is admitted only once the last is trained and its weights pushed (run() admits after push)."""
        counts = self.ledger.counters()
        untrained = counts["in_flight"] - len(self.ledger.held)
        window = (self.lc.staleness_bound + 1) * self.rollout_groups - untrained
        remaining = self.lc.max_steps * self.lc.batch_groups - counts["trained"] - counts["in_flight"]
        capacity = self.cfg.streams.max_len - self.streams.r.xlen(self.keys.prompts)
        return max(0, min(window, remaining, capacity))

    def _publish_prompt(self, group_id: str, epoch: int, item: Item, admitted_version: int, extra=None) -> None:
        hashes = [self.images.put(data) for data in item.images]
        msg = PromptMsg(group_id=group_id, prompt_id=item.id, epoch=epoch, problem=item.problem,
                        image_hashes=hashes, options=item.options, admitted_version=admitted_version,
                        hidden_answer=item.answer)
        pipe = self.streams.r.pipeline(transaction=True)
        pipe.xadd(self.keys.prompts, {PAYLOAD_FIELD: encode(msg)})
        pipe.hset(self.keys.inflight, group_id, admitted_version)
        if extra is not None:
            extra(pipe)
        pipe.execute()

    def admit(self, stop) -> int:
        admitted = 0
        for _ in range(self.admission_room()):
            if stop.is_set():
                break
            prompt = self._next_prompt()
            if prompt is None:  # synthetic-only and none ready yet
                break
            group_id, epoch, cursor, item = prompt

            def count(pipe, epoch=epoch, cursor=cursor):
                if cursor is None:
                    pipe.hincrby(self.keys.state, "synthetic", 1)
                else:
                    pipe.hset(self.keys.state, mapping={"epoch": epoch, "cursor": cursor + 1})
                pipe.hincrby(self.keys.state, "admitted", 1)

            self._publish_prompt(group_id, epoch, item, self.version, count)
            metrics.ADMITTED.inc()
            admitted += 1
        return admitted

    # ---- consumption ----------------------------------------------------------------------------
    def _finish(self, pipe, group_ids: list[str], counter: str) -> None:
        if group_ids:
            pipe.hdel(self.keys.inflight, *group_ids)
            pipe.hincrby(self.keys.state, counter, len(group_ids))

    def _read(self, count: int) -> list[Entry]:
        if not self._taken_over:  # first, whatever an earlier learner of this run read and never acked
            self._taken_over = True
            pending = self.streams.take_over_pending("scored", self.consumer)
            if pending:
                return pending
        return self.streams.read_new("scored", self.consumer, count, block_ms=500)

    def collect(self) -> None:
        needed = max(1, self.rollout_groups - len(self.buffer))
        started = time.perf_counter()
        entries = self._read(needed)
        waited = time.perf_counter() - started
        metrics.WAIT_SECONDS.inc(waited)
        self._waited += waited
        # Buffered, or trained and awaiting its checkpoint: a second copy is a duplicate.
        buffered = {s.group.group_id for _, s in self.buffer} | self.ledger.held_ids()
        for entry in entries:
            try:
                scored = decode(entry.payload or b"", ScoredMsg, self.cfg.streams.max_entry_bytes)
            except MalformedMessage as exc:
                metrics.DEADLETTERED.inc()
                self.streams.dead_letter("scored", entry, str(exc), "learner")
                continue
            gid = scored.group.group_id
            if gid in buffered or not self.ledger.in_flight(gid):
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
        """Drop (and count) groups more than max_staleness versions old (0 in synchronous mode) and, with
        skip_zero_advantage, groups without signal. Groups replayed after a resume were accepted before: they stay."""
        keep, stale, flat = [], [], []
        for entry, scored in self.buffer:
            if entry.id == REPLAYED_ID:
                keep.append((entry, scored))
            elif self.version - scored.group.policy_version > self.lc.staleness_bound:
                stale.append((entry, scored))
            elif self.lc.skip_zero_advantage and zero_advantage(scored.vote.rewards):
                flat.append((entry, scored))
            else:
                keep.append((entry, scored))
        for dropped, counter, metric in ((stale, "dropped_stale", metrics.DROPPED_STALE),
                                         (flat, "skipped_zero_advantage", metrics.SKIPPED_ZERO_ADV)):
            if dropped:
                metric.inc(len(dropped))
                self.streams.ack("scored", [e.id for e, _ in dropped],
                                 lambda p, d=dropped, c=counter: self._finish(p, [s.group.group_id for _, s in d], c))
        self.buffer = keep

    # ---- training -------------------------------------------------------------------------------
    def _image_bytes(self, scored: ScoredMsg) -> list[bytes]:
        try:
            return [self.images.get(h) for h in scored.group.image_hashes]
        except (KeyError, ImageError) as exc:
            raise BatchError(str(exc)) from None

    def train_step(self) -> list[dict[str, float]]:
        """Train on one rollout batch (updates_per_batch optimizer steps); [] while waiting for one."""
        batch, self.buffer = self.buffer[:self.rollout_groups], self.buffer[self.rollout_groups:]
        good, images = [], {}
        for entry, scored in batch:
            try:
                data = self._image_bytes(scored)
                self.batches.encode(scored, data)  # refuse what cannot be trained before any rank starts on it
            except BatchError as exc:  # e.g. its images expired: it cannot be trained on
                metrics.DEADLETTERED.inc()
                self.streams.dead_letter("scored", entry, str(exc), "learner", scored.group.group_id)
                continue
            good.append((entry, scored))
            images.update(zip(scored.group.image_hashes, data))
        if len(good) < self.rollout_groups:
            self.buffer = good + self.buffer  # wait for replacements
            return []
        updates = self.lockstep.call("train", groups=[entry.payload for entry, _ in good], images=images)
        waited, self._waited = self._waited, 0.0
        lags = [self.version - s.group.policy_version for _, s in good]  # versions each group trails the policy
        for lag in lags:
            metrics.VERSION_LAG.observe(lag)
        self.step += len(updates)
        self.version += 1
        rewards = [r for _, s in good for r in s.vote.rewards]
        self.ledger.hold(good, {"step": self.step, "version": self.version,
                                "last_mean_reward": sum(rewards) / len(rewards)})
        for i, stats in enumerate(updates):
            part = good[i * self.lc.batch_groups:(i + 1) * self.lc.batch_groups]
            stats["version_lag_max"] = max(lags[i * self.lc.batch_groups:(i + 1) * self.lc.batch_groups])
            part_rewards = [r for _, s in part for r in s.vote.rewards]
            stats["mean_reward"] = sum(part_rewards) / len(part_rewards)
            # How long the learner sat idle for this batch: ~0 when learner-bound, the rollout time when starved.
            stats["wait_seconds"] = waited if i == 0 else 0.0
            # How sure the policy is of its answers: the learning experiment plots these per step.
            stats["majority_ratio"] = sum(s.vote.majority_ratio for _, s in part) / len(part)
            stats["vote_entropy"] = sum(s.vote.vote_entropy for _, s in part) / len(part)
            labelled = [s.vote.label_correct for _, s in part if s.vote.label_correct is not None]
            if labelled:  # a hidden answer rode along (monitoring only): how often the pseudo-label was right
                stats["label_accuracy"] = sum(labelled) / len(labelled)
            self._observe(stats, self.step - len(updates) + 1 + i, len(part))
        return updates

    def _observe(self, stats: dict[str, float], step: int, groups: int) -> None:
        stats["tokens_per_s"] = stats["tokens"] / max(stats["step_seconds"], 1e-9)
        metrics.STEP.set(step)
        metrics.VERSION.set(self.version)
        metrics.STEPS.inc()
        metrics.TRAINED.inc(groups)
        metrics.TOKENS.inc(stats["tokens"])
        metrics.TOKENS_PER_S.set(stats["tokens_per_s"])
        metrics.REWARD.set(stats["mean_reward"])
        metrics.STEP_SECONDS.observe(stats["step_seconds"])
        metrics.UNCOMMITTED.set(len(self.ledger.held))
        for term in ("loss", "pg_loss", "kl"):
            if term in stats:
                metrics.LOSS.labels(term).set(stats[term])
        for stat in ("clip_frac", "dual_clip_frac", "entropy", "grad_norm", "mismatch_kl", "is_weight_mean",
                     "is_truncated_frac"):
            if stat in stats:
                metrics.STEP_STAT.labels(stat).set(stats[stat])
        self.train_log.append({"step": step, "version": self.version, "time": time.time(), **stats})
        elapsed = time.monotonic() - self.started
        self.steps_this_run += 1
        rate = self.steps_this_run / elapsed if elapsed > 0 else 0.0
        eta = (self.lc.max_steps - step) / rate if rate > 0 else float("inf")
        log.info("step %d/%d loss %.4f reward %.3f kl %.4f | %.2f steps/min, ETA %.0fs", step, self.lc.max_steps,
                 stats["loss"], stats["mean_reward"], stats.get("kl", 0.0), rate * 60, eta)

    # ---- weight sync ----------------------------------------------------------------------------
    def export_state(self):
        """Full weights on rank 0; every rank takes part (ZeRO-3 gathers)."""
        started = time.perf_counter()
        state = self.lockstep.call("export_state")
        metrics.EXPORT_SECONDS.observe(time.perf_counter() - started)
        return state

    def live_servers(self) -> dict[str, dict]:
        return self.streams.servers(max_age_s=3 * self.cfg.rollout.heartbeat_s + 5)

    def push(self, only_lagging: bool = False) -> None:
        servers = self.live_servers()
        targets = [info["grpc"] for info in servers.values()
                   if not only_lagging or int(info.get("version", -1)) < self.version]
        if not targets:
            return
        results = self.pusher.push(self.export_state(), self.version, targets)
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

    # ---- checkpoints ----------------------------------------------------------------------------
    def checkpoint_due(self) -> bool:
        every = self.lc.checkpoint_every
        return every > 0 and self.step // every > max(self.saved_step, 0) // every

    def save_checkpoint(self) -> Path:
        """Write a checkpoint, then commit the groups trained since the last one (ledger.py)."""
        started = time.perf_counter()
        commit = self.ledger.pending_commit(self.step)
        partial = self.checkpoints.begin(self.step)
        self.lockstep.call("save_checkpoint", path=str(partial))
        state = {"run_id": self.cfg.run_id, "step": self.step, "version": self.version,
                 "commit": commit_to_json(commit), "ledger": self.ledger.snapshot(after=commit)}
        path = self.checkpoints.finish(partial, self.step, state)
        self.ledger.commit(commit)
        self.saved_step = self.step
        metrics.UNCOMMITTED.set(0)
        metrics.CHECKPOINT_SECONDS.observe(time.perf_counter() - started)
        log.info("checkpoint %s: %d groups committed (%.1fs)", path, len(commit.groups), time.perf_counter() - started)
        return path

    # ---- the loop -------------------------------------------------------------------------------
    def run(self, stop) -> None:
        try:
            while self.step < self.lc.max_steps and not stop.is_set():
                self.admit(stop)
                self.sync_lagging()
                self.collect()
                if stop.is_set():  # stopping: no new step (it could outlast the grace); the groups wait for --resume
                    break
                if len(self.buffer) >= self.rollout_groups and self.train_step() and not stop.is_set():
                    self.push()
                    if self.checkpoint_due():
                        self.save_checkpoint()
                self.lockstep.keepalive()
            if self.step >= self.lc.max_steps:
                self.finish()
        finally:
            self.lockstep.stop()

    def finish(self) -> None:
        self.push(only_lagging=True)
        path = self.save_checkpoint() if self.saved_step != self.step else self.checkpoints.latest().resolve()
        self.train_log.plot(Path(self.lc.checkpoint_dir) / "train_curves.png")
        self.streams.r.hset(self.keys.state, mapping={"status": "finished", "checkpoint": str(path)})
        log.info("finished: %d steps, checkpoint %s", self.step, path)


def rank_operations(engine: PolicyEngine, builder: BatchBuilder, processor, cfg: LearnerSettings) -> dict:
    """What every rank runs when rank 0 calls it (ranks.Lockstep); arguments are msgpack types."""

    def train(groups: list[bytes], images: dict[str, bytes]) -> list[dict[str, float]]:
        scored = [decode(payload, ScoredMsg) for payload in groups]
        encoded = [(s, builder.encode(s, [images[h] for h in s.group.image_hashes])) for s in scored]
        updates = []
        for start in range(0, len(encoded), cfg.batch_groups):
            share = rank_share(encoded[start:start + cfg.batch_groups], cfg.micro_groups, engine.rank, engine.world)
            updates.append([builder.build(micro) for micro in share])
        return engine.train_rollout_batch(updates)

    def save_checkpoint(path: str) -> None:
        engine.save_engine(Path(path) / "engine")
        state = engine.export_state()
        if engine.rank == 0:
            engine.save_hf(Path(path), processor, state)
        dist.barrier()  # every shard is on disk before rank 0 moves the folder into place

    return {"train": train, "export_state": engine.export_state, "save_checkpoint": save_checkpoint,
            "load_checkpoint": lambda path: engine.load_engine(Path(path) / "engine")}


def learner_app(learner: Learner):
    """HTTP: health, metrics and `GET /v1/status`; nothing here changes state (read-only, no token)."""
    app = base_app("mmupt learner", ready=lambda: True)

    @app.get("/v1/status")
    def status():
        synthesis = {"synthesis": learner.synthetic.report.as_dict()} if learner.synthetic else {}
        return {"version": learner.version, "step": learner.step, "max_steps": learner.lc.max_steps,
                **learner.streams.state(), **learner.ledger.counters(), "uncommitted": len(learner.ledger.held),
                **synthesis}

    return app


def run(settings: Settings, resume: bool = False) -> int:
    if not settings.redis_url:
        raise SystemExit("the learner needs redis_url (config) or MMUPT_REDIS_URL")
    token = require_token(settings.auth)
    engine = PolicyEngine(settings.model, settings.learner, settings.rollout.temperature)
    processor = load_processor(settings.model)
    if engine.rank != 0:
        Lockstep(rank_operations(engine, BatchBuilder(settings, processor), processor, settings.learner)).serve()
        return 0
    service = Service("learner", settings.shutdown_grace_s)
    streams = Streams(connect(settings.redis_url), settings.run_id, settings.streams)
    streams.ensure_groups()
    stream_metrics.register(streams)
    items = load_items(settings.data.train, settings.data, settings.streams)
    pusher = make_pusher(settings, token)
    synthetic = start_continual(settings, items, streams, service)
    learner = Learner(settings, streams, engine, processor, pusher, items, synthetic)
    try:
        learner.start(resume)
    except LedgerMismatch as exc:
        learner.lockstep.stop()
        raise SystemExit(f"mmupt learner: {exc}") from None

    service.serve_http(learner_app(learner), settings.learner.host, settings.learner.http_port)

    service.task("train", lambda: learner.run(service.stop))
    def on_stop() -> None:
        pusher.close()
        if synthetic is not None:
            synthetic.close()

    return service.run_until_stopped(on_stop)
