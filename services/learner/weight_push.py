"""Learner side of gRPC weight sync: push one version to every live rollout server in parallel."""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from mmupt._proto import weights_pb2 as pb
from mmupt._proto import weights_pb2_grpc as pb_grpc
from mmupt.weights import build_manifest, push_messages

from . import metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushResult:
    server: str
    ok: bool
    version: int
    detail: str = ""


class WeightPusher:
    def __init__(self, token: str, run_id: str, chunk_bytes: int, timeout_s: float, retries: int = 2):
        self.token = token
        self.run_id = run_id
        self.chunk_bytes = chunk_bytes
        self.timeout_s = timeout_s
        self.retries = retries
        self._channels: dict[str, grpc.Channel] = {}

    def _stub(self, address: str) -> pb_grpc.WeightSyncStub:
        if address not in self._channels:
            self._channels[address] = grpc.insecure_channel(address, options=[
                ("grpc.max_send_message_length", 64 * 1024 * 1024)])
        return pb_grpc.WeightSyncStub(self._channels[address])

    def _metadata(self):
        return (("authorization", f"Bearer {self.token}"),)

    def _push_one(self, address: str, manifest, views) -> PushResult:
        last = ""
        for attempt in range(self.retries + 1):
            try:
                reply = self._stub(address).Push(push_messages(manifest, views, self.chunk_bytes),
                                                  timeout=self.timeout_s, metadata=self._metadata())
                return PushResult(address, True, reply.version)
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.FAILED_PRECONDITION):
                    break  # retrying cannot help
                metrics.PUSH_RETRIES.inc()
                time.sleep(min(2.0, 0.2 * 2 ** attempt))
        metrics.PUSH_FAILURES.inc()
        log.warning("weight push of version %d to %s failed: %s", manifest.version, address, last)
        return PushResult(address, False, -1, last)

    def push(self, state, version: int, addresses: list[str]) -> list[PushResult]:
        if not addresses:
            return []
        started = time.perf_counter()
        manifest, views = build_manifest(state, version, self.run_id)
        with ThreadPoolExecutor(max_workers=min(16, len(addresses))) as pool:
            results = list(pool.map(lambda a: self._push_one(a, manifest, views), addresses))
        metrics.PUSH_SECONDS.observe(time.perf_counter() - started)
        return results

    def serving_version(self, address: str) -> int:
        reply = self._stub(address).GetVersion(pb.VersionRequest(), timeout=10, metadata=self._metadata())
        return reply.version

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
