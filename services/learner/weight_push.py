"""Learner side of weight sync: push one version to every live rollout server, in parallel.

Both transports share one interface (`push`, `serving_version`, `close`) and one contract: a push
returns within `timeout_s` whatever the servers do (the collective path adds at most REPLY_GRACE_S
for members to report and `prepare_timeout_s` to check failed ones); a server that fails with a
transient error is retried (with backoff, inside the same deadline); every failure is logged and
counted per server in metrics, and the caller's cold sync tries again later. Not thread-safe: one
caller (the learner's training thread) pushes at a time.

- `WeightPusher`: gRPC streams of chunks; works across any network.
- `CollectivePusher`: a gloo (CPU) / NCCL (GPU) broadcast in buckets, with the gRPC service as
  control plane (see mmupt/collective.py for the protocol).
`make_pusher(settings, token)` picks one from `learner.weight_sync`.
"""
from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from mmupt._proto import weights_pb2 as pb
from mmupt._proto import weights_pb2_grpc as pb_grpc
from mmupt.auth import channel_credentials
from mmupt.collective import (BroadcastGroup, CollectiveError, PackBuffers, resolve_backend, run_with_deadline, send_flat,
                              start_store)
from mmupt.config import Settings
from mmupt.weights import WireBuffer, build_manifest, encoded_push

from . import metrics

log = logging.getLogger(__name__)
# Refusals that a retry cannot change (wrong token, a manifest that does not fit, another run or an older version).
PERMANENT = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
PUSH_METHOD = f"/{pb.DESCRIPTOR.services_by_name['WeightSync'].full_name}/Push"
MIN_BROADCAST_S = 0.5
REPLY_GRACE_S = 2.0


@dataclass(frozen=True)
class PushResult:
    server: str
    ok: bool
    version: int              # the version the server serves after the push (-1 if unknown)
    detail: str = ""          # why it failed
    attempts: int = 1
    retryable: bool = True
    stage_seconds: float = 0.0  # the server's time to receive and verify (its clock)
    swap_seconds: float = 0.0   # the server's swap, including the wait for its generation batch


def _failure(server: str, exc: grpc.RpcError, attempts: int = 1) -> PushResult:
    code = exc.code()
    return PushResult(server, False, -1, f"{code.name}: {exc.details()}", attempts, code not in PERMANENT)


class Channels:
    """One gRPC channel per rollout server (TLS when credentials are given) and the bearer token."""

    def __init__(self, token: str, credentials: grpc.ChannelCredentials | None = None,
                 server_name: str | None = None):
        self.metadata = (("authorization", f"Bearer {token}"),)
        self._credentials = credentials
        self._options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                         ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        if server_name:
            self._options.append(("grpc.ssl_target_name_override", server_name))
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def stub(self, address: str) -> pb_grpc.WeightSyncStub:
        with self._lock:
            if address not in self._channels:
                self._channels[address] = (
                    grpc.secure_channel(address, self._credentials, options=self._options) if self._credentials
                    else grpc.insecure_channel(address, options=self._options))
            return pb_grpc.WeightSyncStub(self._channels[address])

    def push_call(self, address: str):
        """WeightSync.Push taking already-serialized messages (see mmupt.weights.encoded_push)."""
        self.stub(address)  # opens the channel
        with self._lock:
            channel = self._channels[address]
        return channel.stream_unary(PUSH_METHOD, request_serializer=None,
                                    response_deserializer=pb.PushReply.FromString)

    def serving_version(self, address: str, timeout_s: float = 10.0) -> int:
        return self.stub(address).GetVersion(pb.VersionRequest(), timeout=timeout_s, metadata=self.metadata).version

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()


class _PusherBase:
    def __init__(self, token: str, run_id: str, timeout_s: float, retries: int, retry_backoff_s: float,
                 wire_dtype: str | None, credentials, server_name: str | None):
        self.run_id = run_id
        self.timeout_s = timeout_s
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self.wire_dtype = wire_dtype
        self.wire = WireBuffer()
        self.channels = Channels(token, credentials, server_name)
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="weight-push")

    def serving_version(self, address: str) -> int:
        return self.channels.serving_version(address)

    def _on_wire(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The state in the wire dtype: cast into the reused wire buffer, or as it is (no copy)."""
        return self.wire.cast(state, self.wire_dtype) if self.wire_dtype else state

    def _backoff(self, attempt: int, deadline: float) -> None:
        time.sleep(max(0.0, min(self.retry_backoff_s * 2 ** attempt, deadline - time.monotonic())))

    def _report(self, version: int, results: list[PushResult], started: float, wire_bytes: int) -> None:
        failed = [r for r in results if not r.ok]
        for result in results:  # every target's series exists (at zero) from its first push on
            metrics.PUSH_FAILURES.labels(result.server)
            metrics.PUSH_RETRIES.labels(result.server)
        for result in failed:
            metrics.PUSH_FAILURES.labels(result.server).inc()
            log.warning("weight push of version %d to %s failed after %d attempt(s): %s", version, result.server,
                        result.attempts, result.detail)
        metrics.PUSH_FAILED_SERVERS.set(len(failed))
        metrics.PUSH_BYTES.inc(wire_bytes * (len(results) - len(failed)))
        elapsed = time.perf_counter() - started
        metrics.PUSH_SECONDS.observe(elapsed)
        log.info("pushed version %d to %d/%d servers in %.2fs (%.1f MB each)", version, len(results) - len(failed),
                 len(results), elapsed, wire_bytes / 1e6)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.channels.close()


class WeightPusher(_PusherBase):
    """gRPC: one client stream per server (manifest, then chunks), all servers in parallel."""

    def __init__(self, token: str, run_id: str, chunk_bytes: int, timeout_s: float, retries: int = 2,
                 retry_backoff_s: float = 0.5, wire_dtype: str | None = None, credentials=None,
                 server_name: str | None = None):
        super().__init__(token, run_id, timeout_s, retries, retry_backoff_s, wire_dtype, credentials, server_name)
        self.chunk_bytes = chunk_bytes

    def push(self, state: dict[str, torch.Tensor], version: int, addresses: list[str]) -> list[PushResult]:
        if not addresses:
            return []
        started = time.perf_counter()
        deadline = time.monotonic() + self.timeout_s
        manifest, payload = build_manifest(self._on_wire(state), version, self.run_id)
        results = list(self._pool.map(lambda a: self._push_one(a, manifest, payload, deadline), addresses))
        self._report(version, results, started, manifest.total_bytes)
        return results

    def _push_one(self, address: str, manifest: pb.Manifest, payload, deadline: float) -> PushResult:
        result = PushResult(address, False, -1, "DEADLINE_EXCEEDED: no time left", 0)
        for attempt in range(self.retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if attempt:
                metrics.PUSH_RETRIES.labels(address).inc()
            try:
                reply = self.channels.push_call(address)(encoded_push(manifest, payload, self.chunk_bytes),
                                                         timeout=remaining, metadata=self.channels.metadata)
                return PushResult(address, True, reply.version, attempts=attempt + 1,
                                  stage_seconds=reply.stage_seconds, swap_seconds=reply.swap_seconds)
            except grpc.RpcError as exc:
                result = _failure(address, exc, attempt + 1)
                if not result.retryable:
                    break
                self._backoff(attempt, deadline)
        return result


class CollectivePusher(_PusherBase):
    """Collective: Prepare on every target, then one broadcast to the group of those that accepted.

    A group is kept while its members stay the same and its syncs succeed; anything else (a member
    joins, leaves, fails or times out) drops it, and the next attempt rendezvouses a fresh group under
    a new id. A member that did not answer a failed sync (hung, not just disconnected) becomes a
    suspect: suspects are synced in a group of their own, after the others, so a hung server can
    delay only itself.
    """

    def __init__(self, token: str, run_id: str, timeout_s: float, bucket_bytes: int, backend: str = "auto",
                 store_port: int = 0, store_host: str = "127.0.0.1", retries: int = 2, retry_backoff_s: float = 0.5,
                 wire_dtype: str | None = None, credentials=None, server_name: str | None = None,
                 prepare_timeout_s: float = 5.0):
        super().__init__(token, run_id, timeout_s, retries, retry_backoff_s, wire_dtype, credentials, server_name)
        self.bucket_bytes = bucket_bytes
        self.backend = resolve_backend(backend)
        self.prepare_timeout_s = prepare_timeout_s
        self.store = start_store(store_port, timeout_s)
        self.store_host = store_host
        self.store_port = self.store.port
        self.suspects: set[str] = set()
        self._groups: dict[tuple[str, ...], BroadcastGroup] = {}
        self._buffers: PackBuffers | None = None

    def group_id(self, members: list[str]) -> str | None:
        """The id of the live group of exactly these members, if one is kept."""
        group = self._groups.get(tuple(sorted(members)))
        return group.group_id if group else None

    def push(self, state: dict[str, torch.Tensor], version: int, addresses: list[str]) -> list[PushResult]:
        if not addresses:
            return []
        started = time.perf_counter()
        deadline = time.monotonic() + self.timeout_s
        # No checksum pass up front: send_flat computes it while sending and broadcasts it last.
        manifest, payload = build_manifest(self._on_wire(state), version, self.run_id, checksum=False)
        # A cast version sits in the wire buffer as the flat layout itself: broadcast it in big slices.
        flat = self.wire.flat if self.wire_dtype and self.wire.holds(payload, manifest.tensors) else None
        results: dict[str, PushResult] = {}
        pending = sorted(set(addresses))
        for attempt in range(self.retries + 1):
            if not pending or deadline - time.monotonic() <= 0:
                break
            if attempt:
                for address in pending:
                    metrics.PUSH_RETRIES.labels(address).inc()
                self._backoff(attempt - 1, deadline)
            outcome: dict[str, PushResult] = {}
            for batch in ([a for a in pending if a not in self.suspects], [a for a in pending if a in self.suspects]):
                if batch and deadline - time.monotonic() > 0:
                    outcome.update(self._attempt(manifest, payload, flat, batch, deadline))
            results.update({a: dataclasses.replace(r, attempts=attempt + 1) for a, r in outcome.items()})
            pending = [a for a, r in outcome.items() if not r.ok and r.retryable]
        ordered = [results.get(a) or PushResult(a, False, -1, "DEADLINE_EXCEEDED: no time left", 0)
                   for a in addresses]
        self._report(version, ordered, started, manifest.total_bytes)
        return ordered

    def _attempt(self, manifest: pb.Manifest, payload, flat, targets: list[str], deadline: float) -> dict[str, PushResult]:
        results = {}
        members = []
        for address, outcome in zip(targets, self._pool.map(lambda a: self._prepare(a, manifest, deadline), targets)):
            if isinstance(outcome, PushResult):
                results[address] = outcome
            else:
                members.append(address)
        if members:
            results.update(self._broadcast(manifest, payload, flat, members, deadline))
        return results

    def _prepare(self, address: str, manifest: pb.Manifest, deadline: float) -> PushResult | None:
        """None if the server wants this version; else its result (already serving, or refused)."""
        timeout = max(0.01, min(self.prepare_timeout_s, deadline - time.monotonic()))
        try:
            reply = self.channels.stub(address).Prepare(manifest, timeout=timeout, metadata=self.channels.metadata)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                self.suspects.add(address)  # alive enough to accept a connection, too stuck to answer
            return _failure(address, exc)
        return None if reply.needed else PushResult(address, True, reply.serving_version)

    def _broadcast(self, manifest: pb.Manifest, payload, flat, members: list[str],
                   deadline: float) -> dict[str, PushResult]:
        key = tuple(members)
        group = self._groups.get(key)
        if group is None:
            self._drop_groups_with(members)  # each member keeps one group: joining a new one leaves the old
        group_id = group.group_id if group else uuid.uuid4().hex
        world_size = len(members) + 1
        remaining = deadline - time.monotonic()
        if remaining < MIN_BROADCAST_S:  # Prepare took what was left: do not start what cannot finish
            return {a: PushResult(a, False, -1, "DEADLINE_EXCEEDED: no time left to broadcast") for a in members}
        replies = {}
        for rank, address in enumerate(members, start=1):
            request = pb.ReceiveRequest(
                manifest=manifest, bucket_bytes=self.bucket_bytes, timeout_s=remaining, contiguous=flat is not None,
                group=pb.GroupInfo(store_host=self.store_host, store_port=self.store_port, group_id=group_id,
                                   rank=rank, world_size=world_size, backend=self.backend))
            # A member gives up at `remaining`; its answer (after its swap, or its failure) gets a grace.
            replies[address] = self.channels.stub(address).Receive.future(
                request, timeout=remaining + REPLY_GRACE_S, metadata=self.channels.metadata)
        live = {}

        def send():
            live["group"] = group or BroadcastGroup(self.store, group_id, 0, world_size, self.backend, self.timeout_s)
            send_flat(live["group"], payload, manifest.tensors, self.bucket_bytes, self._pack_buffers(live["group"].device),
                      flat)
            return live["group"]

        def abort():
            if "group" in live:
                live["group"].abort()

        failure = None
        try:
            self._groups[key] = run_with_deadline(send, remaining, f"broadcast of version {manifest.version}", abort)
        except CollectiveError as exc:
            abort()
            self._groups.pop(key, None)
            self._buffers = None  # an abandoned broadcast may still be packing into them
            failure = str(exc)
        results = self._replies(replies, deadline, failure)
        if not all(r.ok for r in results.values()):
            self._drop_groups_with(members)  # its state is unknown now: the next attempt builds a fresh one
        return results

    def _replies(self, replies: dict, deadline: float, failure: str | None) -> dict[str, PushResult]:
        """Each member's answer. After a failed broadcast the members still waiting are called off
        (cancelling their Receive makes them give up); failed members that do not even answer a
        version query become suspects."""
        results = {}
        for address, future in replies.items():
            try:
                if failure is not None and not future.done():
                    future.cancel()
                    raise grpc.FutureTimeoutError()
                reply = future.result(timeout=max(0.0, deadline + REPLY_GRACE_S - time.monotonic()))
                results[address] = PushResult(address, True, reply.version, stage_seconds=reply.stage_seconds,
                                              swap_seconds=reply.swap_seconds)
            except grpc.RpcError as exc:
                results[address] = _failure(address, exc) if failure is None else \
                    PushResult(address, False, -1, f"UNAVAILABLE: {failure}")
            except grpc.FutureTimeoutError:
                future.cancel()
                results[address] = PushResult(address, False, -1, f"UNAVAILABLE: {failure or 'no reply in time'}")
        failed = [a for a, r in results.items() if not r.ok]
        for address, answers in zip(failed, self._pool.map(self._answers, failed)):
            if not answers:
                results[address] = dataclasses.replace(results[address], detail="DEADLINE_EXCEEDED: not answering; "
                                                       + results[address].detail)
                self.suspects.add(address)
        self.suspects.difference_update(a for a, r in results.items() if r.ok)
        return results

    def _answers(self, address: str) -> bool:
        try:
            self.channels.serving_version(address, timeout_s=self.prepare_timeout_s)
            return True
        except grpc.RpcError:
            return False

    def _pack_buffers(self, device: torch.device) -> PackBuffers:
        if self._buffers is None or self._buffers.device != device:
            self._buffers = PackBuffers(device)
        return self._buffers

    def _drop_groups_with(self, members: list[str]) -> None:
        for key in [k for k in self._groups if set(k) & set(members)]:
            self._groups.pop(key).abort()

    def close(self) -> None:
        for group in self._groups.values():
            group.abort()
        self._groups.clear()
        super().close()


def store_advertise_host(settings: Settings) -> str:
    if settings.weights.store_advertise_host:
        return settings.weights.store_advertise_host
    host = settings.learner.host
    return socket.gethostname() if host in ("0.0.0.0", "::") else host


def make_pusher(settings: Settings, token: str) -> WeightPusher | CollectivePusher:
    """The pusher `learner.weight_sync` asks for, with the run's deadline, retries, wire dtype and TLS."""
    lc, ws = settings.learner, settings.weights
    common = dict(token=token, run_id=settings.run_id, timeout_s=lc.push_timeout_s, retries=ws.retries,
                  retry_backoff_s=ws.retry_backoff_s, wire_dtype=lc.wire_dtype,
                  credentials=channel_credentials(settings.auth), server_name=settings.auth.tls_server_name)
    if lc.weight_sync == "collective":
        return CollectivePusher(bucket_bytes=ws.bucket_bytes, backend=ws.collective_backend, store_port=ws.store_port,
                                store_host=store_advertise_host(settings), **common)
    return WeightPusher(chunk_bytes=lc.push_chunk_bytes, **common)
