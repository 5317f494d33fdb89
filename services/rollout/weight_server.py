"""gRPC WeightSync server: stage a pushed version, verify it fully, swap atomically, then ack."""
from __future__ import annotations

import logging
import threading
import time
from concurrent import futures

import grpc

from mmupt._proto import weights_pb2 as pb
from mmupt._proto import weights_pb2_grpc as pb_grpc
from mmupt.auth import bearer_ok
from mmupt.weights import StagedPush, WeightSyncError, state_checksum

from . import metrics

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class WeightSyncServicer(pb_grpc.WeightSyncServicer):
    def __init__(self, backend, token: str, run_id: str):
        self.backend = backend
        self.token = token
        self.run_id = run_id
        self._sha_lock = threading.Lock()
        # Checksums in the same byte layout a push uses, so "did the weights change?" is one compare.
        self.initial_sha256 = state_checksum(backend.state_dict())
        self._sha256 = self.initial_sha256

    def serving_sha256(self) -> str:
        with self._sha_lock:
            return self._sha256

    def _authorize(self, context) -> None:
        header = dict(context.invocation_metadata()).get("authorization")
        if not bearer_ok(header, self.token):
            metrics.WEIGHT_PUSHES.labels("unauthenticated").inc()
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

    def Push(self, request_iterator, context):
        self._authorize(context)
        started = time.perf_counter()
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "manifest":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a push must start with its manifest")
        manifest = first.manifest
        if manifest.run_id != self.run_id:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"push for run {manifest.run_id!r}, this server serves run {self.run_id!r}")
        serving = self.backend.version
        if manifest.version < serving:
            metrics.WEIGHT_PUSHES.labels("refused_old").inc()
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"version {manifest.version} is older than the serving version {serving}")
        if manifest.version == serving:  # a retried push: already serving it
            return pb.PushReply(version=serving, swapped=False, sha256=self.serving_sha256())
        try:
            staged = StagedPush(manifest, self.backend.weight_specs())
            for message in request_iterator:
                if message.WhichOneof("kind") != "chunk":
                    raise WeightSyncError("a second manifest inside one push")
                staged.add(message.chunk)
            state = staged.finish()
        except WeightSyncError as exc:
            metrics.WEIGHT_PUSHES.labels("invalid").inc()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        staged_s = time.perf_counter() - started
        swap_started = time.perf_counter()
        if not self.backend.swap_weights(state, manifest.version):
            metrics.WEIGHT_PUSHES.labels("refused_old").inc()
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"version {manifest.version} is not newer than the serving version {self.backend.version}")
        with self._sha_lock:
            self._sha256 = manifest.sha256
        metrics.SWAP_SECONDS.observe(time.perf_counter() - swap_started)
        metrics.WEIGHT_PUSHES.labels("ok").inc()
        metrics.VERSION.set(manifest.version)
        log.info("now serving version %d (%d bytes staged in %.2fs)", manifest.version, manifest.total_bytes, staged_s)
        return pb.PushReply(version=manifest.version, swapped=True, sha256=manifest.sha256)

    def GetVersion(self, request, context):
        return pb.VersionReply(version=self.backend.version, sha256=self.serving_sha256())


def start_server(servicer: WeightSyncServicer, host: str, port: int) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ])
    pb_grpc.add_WeightSyncServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the weight-sync port {host}:{port}")
    server.start()
    return server, bound
