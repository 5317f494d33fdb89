"""The Redis contract of one run: keys under `mmupt:{run_id}:`.

| key               | type   | producer -> consumer group |
| prompts           | stream | learner -> rollout         |
| groups            | stream | rollout -> voter           |
| scored            | stream | voter -> learner           |
| deadletter        | stream | anyone (entries that could not be processed, with the reason) |
| image:{sha256}    | string | content-addressed image bytes, with TTL |
| state             | hash   | learner: version, step, counters, status |
| inflight          | hash   | learner: group_id -> admitted version, for admitted and not yet finished groups |
| rollout:servers   | hash   | rollout servers: weight-sync address, version, heartbeat |
| learner:replay    | list   | learner: scored groups trained since its last checkpoint, in training order |

Consumers read with XREADGROUP, and a result is appended and its input acked *and deleted* in one
MULTI/EXEC transaction, so a crash never loses an entry nor leaves a processed one pending. Entries
claimed by a crashed consumer are reclaimed with XAUTOCLAIM once idle; entries delivered too often
(poison messages) go to the dead-letter stream. Because processed entries are deleted, a stream's
length is its unfinished work: producers wait while it is at `max_len` (back-pressure) rather than
trimming; `MAXLEN ~` is only a far safety cap.
"""
from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from .config import StreamSettings
from .wire import PAYLOAD_FIELD

log = logging.getLogger(__name__)

# stream -> the consumer group that reads it
CONSUMER_GROUPS = {"prompts": "rollout", "groups": "voter", "scored": "learner"}
# The hard cap is this many times max_len; back-pressure keeps streams far below it.
SAFETY_CAP_FACTOR = 4


# How long the marker of a MULTI/EXEC lives: well beyond the client's retries (~15 s at most). Markers
# are the one thing transactions leave behind (~72 bytes each): TTL x transaction rate of them.
TXN_MARKER_TTL_S = 60


class ExactlyOncePipeline(redis.client.Pipeline):
    """A MULTI/EXEC that a retry never runs twice.

    redis-py retries a transaction after a connection error. If the server had already run EXEC
    when the connection broke (a dropped connection, or a server killed after its AOF fsync but
    before it answered), a blind retry runs it again: a counter incremented twice, a prompt admitted
    twice. So each transaction also sets a unique marker key, atomically with its other commands; a
    retry first asks whether the marker exists, and if it does the transaction ran and is not sent
    again (its replies, lost with the connection, come back as None).
    """

    def execute(self, raise_on_error: bool = True):
        marked = (self.transaction or self.explicit_transaction) and bool(self.command_stack) and not self.watching
        if marked:
            self._marker, self._sent = f"mmupt:txn:{uuid.uuid4().hex}", False
            self.set(self._marker, 1, ex=TXN_MARKER_TTL_S)
        results = super().execute(raise_on_error)
        return results[:-1] if marked else results

    def _execute_transaction(self, connection, commands, raise_on_error):
        marker = getattr(self, "_marker", None)
        if marker is not None and self._sent:  # a retry: did the first attempt run?
            connection.send_command("EXISTS", marker)
            if connection.read_response():
                log.warning("a transaction ran but its reply was lost with the connection; not running it again")
                return [None] * len(commands)
        self._sent = True
        return super()._execute_transaction(connection, commands, raise_on_error)


class Client(redis.Redis):
    def pipeline(self, transaction=True, shard_hint=None) -> ExactlyOncePipeline:
        return ExactlyOncePipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


def connect(url: str) -> Client:
    """A client that retries with backoff and jitter across connection blips and server restarts,
    and never runs a transaction twice (ExactlyOncePipeline)."""
    retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=5.0), retries=8)
    return Client.from_url(
        url, retry=retry, retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=30, socket_connect_timeout=5,
    )


class RunKeys:
    """Every key of one run lives under `mmupt:{run_id}:`."""

    def __init__(self, run_id: str):
        self.prefix = p = f"mmupt:{run_id}:"
        self.prompts, self.groups, self.scored = p + "prompts", p + "groups", p + "scored"
        self.deadletter, self.state, self.inflight = p + "deadletter", p + "state", p + "inflight"
        self.servers = p + "rollout:servers"
        self.replay = p + "learner:replay"

    def stream(self, name: str) -> str:
        if name not in CONSUMER_GROUPS and name != "deadletter":
            raise KeyError(f"unknown stream {name!r}")
        return self.prefix + name

    def image(self, sha256: str) -> str:
        return f"{self.prefix}image:{sha256}"


@dataclass(frozen=True)
class Entry:
    id: bytes
    payload: bytes | None  # None when the entry lacks the payload field (malformed)
    redelivered: bool = False


class Streams:
    """Stream operations of one run, shared by every service."""

    def __init__(self, client: redis.Redis, run_id: str, settings: StreamSettings):
        self.r = client
        self.keys = RunKeys(run_id)
        self.cfg = settings
        self._pending_drained: set[tuple[str, str]] = set()
        self._last_claim: dict[tuple[str, str], float] = {}

    # ---- set-up -------------------------------------------------------------------------------
    def ensure_groups(self) -> None:
        for name, group in CONSUMER_GROUPS.items():
            try:
                self.r.xgroup_create(self.keys.stream(name), group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    # ---- producing ----------------------------------------------------------------------------
    def wait_for_room(self, stream: str, stop: threading.Event | None = None, needed: int = 1) -> bool:
        """Back-pressure: wait while `stream` holds max_len unprocessed entries. False if stopped."""
        key = self.keys.stream(stream)
        delay = 0.01
        while self.r.xlen(key) + needed > self.cfg.max_len:
            if stop is not None and stop.is_set():
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        return True

    def _xadd(self, pipe, stream: str, payload: bytes) -> None:
        pipe.xadd(self.keys.stream(stream), {PAYLOAD_FIELD: payload},
                  maxlen=self.cfg.max_len * SAFETY_CAP_FACTOR, approximate=True)

    def append(self, stream: str, payloads: list[bytes], stop: threading.Event | None = None) -> bool:
        if not self.wait_for_room(stream, stop, needed=len(payloads)):
            return False
        pipe = self.r.pipeline(transaction=True)
        for payload in payloads:
            self._xadd(pipe, stream, payload)
        pipe.execute()
        return True

    def append_and_ack(self, out_stream: str, payloads: list[bytes], in_stream: str, ids: list[bytes],
                       stop: threading.Event | None = None, extra=None) -> bool:
        """Append results and ack+delete their inputs atomically (MULTI/EXEC).

        `extra(pipe)` may queue more commands into the same transaction. Returns False (nothing
        written, nothing acked) when stopped while waiting for room.
        """
        if payloads and not self.wait_for_room(out_stream, stop, needed=len(payloads)):
            return False
        pipe = self.r.pipeline(transaction=True)
        for payload in payloads:
            self._xadd(pipe, out_stream, payload)
        self._queue_ack(pipe, in_stream, ids)
        if extra is not None:
            extra(pipe)
        pipe.execute()
        return True

    def ack(self, in_stream: str, ids: list[bytes], extra=None) -> None:
        pipe = self.r.pipeline(transaction=True)
        self._queue_ack(pipe, in_stream, ids)
        if extra is not None:
            extra(pipe)
        pipe.execute()

    def _queue_ack(self, pipe, in_stream: str, ids: list[bytes]) -> None:
        if ids:
            key = self.keys.stream(in_stream)
            pipe.xack(key, CONSUMER_GROUPS[in_stream], *ids)
            pipe.xdel(key, *ids)

    # ---- consuming ----------------------------------------------------------------------------
    def read(self, stream: str, consumer: str, count: int, block_ms: int | None = None) -> list[Entry]:
        """Next entries for `consumer`: its own pending ones after a restart first, then entries
        reclaimed from crashed consumers (periodically), then new ones (blocking up to block_ms)."""
        key, group = self.keys.stream(stream), CONSUMER_GROUPS[stream]
        slot = (stream, consumer)
        if slot not in self._pending_drained:
            own = self._parse(self.r.xreadgroup(group, consumer, {key: "0"}, count=count), redelivered=True)
            if own:
                return self._screen(stream, own)
            self._pending_drained.add(slot)
        now = time.monotonic()
        if now - self._last_claim.get(slot, 0.0) >= self.cfg.claim_idle_ms / 4000:
            self._last_claim[slot] = now
            claimed = self._claim(stream, consumer, count)
            if claimed:
                return self._screen(stream, claimed)
        return self.read_new(stream, consumer, count, block_ms)

    def read_new(self, stream: str, consumer: str, count: int, block_ms: int | None = None) -> list[Entry]:
        """Entries never delivered before (blocking up to block_ms)."""
        key, group = self.keys.stream(stream), CONSUMER_GROUPS[stream]
        block = self.cfg.block_ms if block_ms is None else block_ms
        reply = self.r.xreadgroup(group, consumer, {key: ">"}, count=count, block=block or None)
        return self._parse(reply)

    def take_over_pending(self, stream: str, consumer: str, batch: int = 256) -> list[Entry]:
        """Claim every delivered-but-unacked entry of the stream's group for `consumer`, oldest first.

        For a stream with a single consumer (the learner): at start-up, whatever a previous instance
        read and did not ack is its own unfinished work, whatever consumer name it ran under.
        """
        key, group = self.keys.stream(stream), CONSUMER_GROUPS[stream]
        entries, start = [], "0-0"
        while True:
            reply = self.r.xautoclaim(key, group, consumer, min_idle_time=0, start_id=start, count=batch)
            entries.extend(self._entry(eid, fields, True) for eid, fields in reply[1] if fields is not None)
            start = reply[0]
            if start in (b"0-0", "0-0"):
                return entries

    def hand_back(self, stream: str, consumer: str, batch: int = 256) -> int:
        """On a graceful stop: make every entry `consumer` holds unacked claimable by the others at
        once (XCLAIM to itself with the idle time set to claim_idle_ms; JUSTID: not a new delivery),
        instead of after claim_idle_ms. Returns how many were handed back."""
        key, group = self.keys.stream(stream), CONSUMER_GROUPS[stream]
        handed = 0
        while True:
            pending = self.r.xpending_range(key, group, min="-", max="+", count=batch, consumername=consumer,
                                            idle=None)
            ids = [p["message_id"] for p in pending if p["time_since_delivered"] < self.cfg.claim_idle_ms]
            if not ids:
                return handed
            self.r.xclaim(key, group, consumer, min_idle_time=0, message_ids=ids, idle=self.cfg.claim_idle_ms,
                          justid=True)
            handed += len(ids)

    def _claim(self, stream: str, consumer: str, count: int) -> list[Entry]:
        key, group = self.keys.stream(stream), CONSUMER_GROUPS[stream]
        reply = self.r.xautoclaim(key, group, consumer, min_idle_time=self.cfg.claim_idle_ms,
                                  start_id="0-0", count=count)
        messages = reply[1] if len(reply) > 1 else []
        entries = [self._entry(eid, fields, True) for eid, fields in messages if fields is not None]
        if entries:
            log.warning("reclaimed %d idle entries from %s", len(entries), key)
        return entries

    def _screen(self, stream: str, entries: list[Entry]) -> list[Entry]:
        """Dead-letter entries delivered more than max_deliveries times (poison messages)."""
        key, group = self.keys.stream(stream), CONSUMER_GROUPS[stream]
        kept = []
        for entry in entries:
            info = self.r.xpending_range(key, group, min=entry.id, max=entry.id, count=1)
            times = info[0]["times_delivered"] if info else 0
            if times > self.cfg.max_deliveries:
                self.dead_letter(stream, entry, f"delivered {times} times without success", "streams")
            else:
                kept.append(entry)
        return kept

    @staticmethod
    def _entry(eid, fields, redelivered=False) -> Entry:
        return Entry(id=eid, payload=(fields or {}).get(PAYLOAD_FIELD), redelivered=redelivered)

    def _parse(self, reply, redelivered=False) -> list[Entry]:
        out = []
        for _key, messages in reply or []:
            out.extend(self._entry(eid, fields, redelivered) for eid, fields in messages)
        return out

    # ---- dead letters -------------------------------------------------------------------------
    def dead_letter(self, stream: str, entry: Entry, reason: str, service: str, group_id: str | None = None) -> None:
        """Move an unprocessable entry to the dead-letter stream, with the reason, and ack it.

        With `group_id` (when the entry could be parsed) the admitted group leaves the in-flight set
        and is counted as dead-lettered, so the run's accounting stays exact.
        """
        log.error("dead-letter %s %s: %s", stream, entry.id, reason)
        record = {
            b"stream": stream.encode(), b"entry_id": entry.id, b"reason": reason.encode()[:2000],
            b"service": service.encode(), b"time": str(time.time()).encode(),
            b"group_id": (group_id or "").encode(),
            # Keep the raw payload (bounded) so nothing is lost and it can be inspected or replayed.
            b"payload": (entry.payload or b"")[: 1024 * 1024],
        }
        pipe = self.r.pipeline(transaction=True)
        pipe.xadd(self.keys.deadletter, record, maxlen=self.cfg.deadletter_max_len, approximate=True)
        self._queue_ack(pipe, stream, [entry.id])
        if group_id is not None:
            pipe.hdel(self.keys.inflight, group_id)
            pipe.hincrby(self.keys.state, "deadlettered", 1)
        pipe.execute()

    # ---- run state and registry ---------------------------------------------------------------
    def state(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.r.hgetall(self.keys.state).items()}

    def state_int(self, field: str, default: int = 0) -> int:
        value = self.r.hget(self.keys.state, field)
        return int(value) if value is not None else default

    def register_server(self, server_id: str, info: dict) -> None:
        self.r.hset(self.keys.servers, server_id, json.dumps({**info, "heartbeat": time.time()}))

    def unregister_server(self, server_id: str) -> None:
        self.r.hdel(self.keys.servers, server_id)

    def servers(self, max_age_s: float | None = None) -> dict[str, dict]:
        now, out = time.time(), {}
        for sid, raw in self.r.hgetall(self.keys.servers).items():
            try:
                info = json.loads(raw)
            except ValueError:
                continue
            if max_age_s is None or now - float(info.get("heartbeat", 0)) <= max_age_s:
                out[sid.decode()] = info
        return out

    def pending_counts(self) -> dict[str, dict[str, int]]:
        """Length and pending (claimed, unacked) count of each stream, for metrics and accounting."""
        out = {}
        for name, group in CONSUMER_GROUPS.items():
            key = self.keys.stream(name)
            length = self.r.xlen(key)
            try:
                pending = self.r.xpending(key, group)["pending"]
            except redis.ResponseError:
                pending = 0
            out[name] = {"length": length, "pending": pending}
        out["deadletter"] = {"length": self.r.xlen(self.keys.deadletter), "pending": 0}
        return out


def backoff_sleep(attempt: int, base: float = 0.2, cap: float = 10.0) -> None:
    """Exponential backoff with full jitter, for service loops reconnecting after an error."""
    time.sleep(random.uniform(0, min(cap, base * 2 ** attempt)))
