"""The learner's account in Redis, kept consistent with its checkpoints.

Counters live in the run's `state` hash: admitted = trained + dropped_stale + skipped_zero_advantage
+ deadlettered + in flight (the `inflight` hash), each updated in the same transaction as the ack
that changes it.

Training on a group moves its scored entry out of the `scored` stream into the `learner:replay`
list (XACK + XDEL + RPUSH in one transaction), in training order; the group stays in flight and is
not yet counted as trained. Writing a checkpoint *commits* those groups: one transaction takes them
out of `inflight`, counts them trained, empties the replay list and records `committed_step`. A
learner that dies between checkpoints restarts from its last checkpoint and first retrains the
replay list, in the same order: model and ledger rewind together and no group counts twice. The
commit is also written into the checkpoint, so a crash between the two is repaired at resume.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from mmupt.streams import Entry, Streams
from mmupt.wire import ScoredMsg

COUNTERS = ("admitted", "trained", "dropped_stale", "dropped_vote", "skipped_zero_advantage", "duplicates",
            "deadlettered", "synthetic")  # synthetic: admitted prompts written by the model (continual mode)
# Entry id of a group replayed from the ledger rather than read from the stream. "0-0" is never an
# entry's id (XADD refuses it), so acking it is a harmless no-op.
REPLAYED_ID = b"0-0"


class LedgerMismatch(RuntimeError):
    """The run's Redis ledger and checkpoint folder disagree with each other, or with how the learner
    was started (fresh or --resume); going on would lose or repeat work."""


@dataclass(frozen=True)
class Commit:
    """Groups trained between two checkpoints, made final when the later one is written."""
    step: int
    previous_step: int
    groups: list[str]
    reward_sum: float
    reward_count: int


class Ledger:
    def __init__(self, streams: Streams):
        self.streams = streams
        self.r = streams.r
        self.keys = streams.keys
        # (group_id, reward sum, reward count) of groups trained since the last commit, in order.
        self.held: list[tuple[str, float, int]] = []

    # ---- reading --------------------------------------------------------------------------------
    def exists(self) -> bool:
        return bool(self.r.exists(self.keys.state))

    def counters(self) -> dict[str, int]:
        state = self.streams.state()
        return {c: int(state.get(c, 0)) for c in COUNTERS} | {"in_flight": self.r.hlen(self.keys.inflight)}

    def committed_step(self) -> int:
        return self.streams.state_int("committed_step", 0)

    def held_ids(self) -> set[str]:
        return {gid for gid, _, _ in self.held}

    def replay(self) -> list[bytes]:
        """Scored payloads trained since the last commit, in training order."""
        return self.r.lrange(self.keys.replay, 0, -1)

    def in_flight(self, group_id: str) -> bool:
        return bool(self.r.hexists(self.keys.inflight, group_id))

    # ---- writing --------------------------------------------------------------------------------
    def init(self) -> None:
        self.r.hset(self.keys.state, mapping={"version": 0, "step": 0, "committed_step": 0, "status": "running",
                                              "epoch": 0, "cursor": 0, **{c: 0 for c in COUNTERS}})

    def hold(self, trained: list[tuple[Entry, ScoredMsg]], state: dict) -> None:
        """Groups just trained on: out of the stream into the replay list; `state` fields set alongside."""
        fresh = [entry for entry, _ in trained if entry.id != REPLAYED_ID]  # replayed ones are there already

        def record(pipe):
            if fresh:
                pipe.rpush(self.keys.replay, *[entry.payload for entry in fresh])
            pipe.hset(self.keys.state, mapping=state)

        self.streams.ack("scored", [entry.id for entry in fresh], record)
        self.held.extend((s.group.group_id, sum(s.vote.rewards), len(s.vote.rewards)) for _, s in trained)

    def pending_commit(self, step: int) -> Commit:
        return Commit(step=step, previous_step=self.committed_step(), groups=[gid for gid, _, _ in self.held],
                      reward_sum=sum(r for _, r, _ in self.held), reward_count=sum(n for _, _, n in self.held))

    def commit(self, commit: Commit) -> None:
        pipe = self.r.pipeline(transaction=True)
        if commit.groups:
            pipe.hdel(self.keys.inflight, *commit.groups)
        pipe.hincrby(self.keys.state, "trained", len(commit.groups))
        pipe.hincrbyfloat(self.keys.state, "reward_sum", commit.reward_sum)
        pipe.hincrby(self.keys.state, "reward_count", commit.reward_count)
        pipe.delete(self.keys.replay)
        pipe.hset(self.keys.state, "committed_step", commit.step)
        pipe.execute()
        self.held = []

    # ---- checkpoints ----------------------------------------------------------------------------
    def snapshot(self, after: Commit) -> dict:
        """The ledger as it will be once `after` is committed: enough to rebuild it in an empty Redis."""
        state = self.streams.state()
        inflight = {k.decode(): int(v) for k, v in self.r.hgetall(self.keys.inflight).items()}
        for gid in after.groups:
            inflight.pop(gid, None)
        counters = {c: int(state.get(c, 0)) for c in COUNTERS}
        counters["trained"] += len(after.groups)
        return {
            "counters": counters, "inflight": inflight, "committed_step": after.step,
            "epoch": int(state.get("epoch", 0)), "cursor": int(state.get("cursor", 0)),
            "version": int(state.get("version", 0)),
            "reward_sum": float(state.get("reward_sum", 0.0)) + after.reward_sum,
            "reward_count": int(state.get("reward_count", 0)) + after.reward_count,
        }

    def restore(self, snapshot: dict) -> None:
        """Rebuild the ledger from a checkpoint in a Redis that lost it (the groups in flight then
        are admitted again by the caller)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self.keys.inflight, self.keys.replay)
        pipe.hset(self.keys.state, mapping={
            **snapshot["counters"], "committed_step": snapshot["committed_step"], "step": snapshot["committed_step"],
            "epoch": snapshot["epoch"], "cursor": snapshot["cursor"], "version": snapshot["version"],
            "reward_sum": snapshot["reward_sum"], "reward_count": snapshot["reward_count"], "status": "running"})
        pipe.execute()

    def reconcile(self, checkpoint_step: int, commit: Commit | None) -> None:
        """Make Redis agree with the checkpoint being resumed (step 0: the initial model)."""
        committed = self.committed_step()
        if committed == checkpoint_step:
            return
        if commit is not None and committed == commit.previous_step and checkpoint_step == commit.step:
            self.commit(commit)  # the learner died after writing the checkpoint, before committing it
            return
        raise LedgerMismatch(
            f"Redis has committed training up to step {committed} but the checkpoint to resume is at step "
            f"{checkpoint_step}: is learner.checkpoint_dir the folder of run {self.keys.prefix.split(':')[1]!r}?")


def commit_from_json(data: dict | None) -> Commit | None:
    return Commit(**data) if data else None


def commit_to_json(commit: Commit) -> dict:
    return asdict(commit)
