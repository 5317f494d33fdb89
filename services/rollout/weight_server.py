"""gRPC WeightSync server: stage a pushed version, verify it fully, swap atomically, then ack.

Two ways in, one staging path: a gRPC stream of chunks (`Push`), or a collective broadcast that the
learner announces through `Prepare` and `Receive` (see mmupt/collective.py). Either way the bytes
land in a staging buffer, are verified (names, shapes, sizes, every byte, the checksum), and only
then does `Backend.swap_weights` replace the weights, under the backend's generation lock. Older
versions are refused, the serving version is idempotent, a broken push leaves the last good version.

One transfer stages at a time, into one CPU buffer reused from push to push: first-touching a fresh
gigabyte costs seconds on a VM. So `swap_weights` must copy what it is given (load_state_dict does)
and keep no reference to it. A buffer that an abandoned broadcast might still write into is dropped.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent import futures

import grpc
import torch

from mmupt._proto import weights_pb2 as pb
from mmupt._proto import weights_pb2_grpc as pb_grpc
from mmupt.auth import bearer_ok
from mmupt.collective import CollectiveError, GroupMembership, drain_flat, receive_flat, run_with_deadline
from mmupt.weights import (ChunkView, StagedPush, WeightSyncError, check_manifest, decode_push_message, flat_offsets,
                           state_checksum)

from . import metrics

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class WeightSyncServicer(pb_grpc.WeightSyncServicer):
    def __init__(self, backend, token: str, run_id: str):
        self.backend = backend
        self.token = token
        self.run_id = run_id
        self.membership = GroupMembership()
        self._stage_lock = threading.Lock()
        self._staging: torch.Tensor | None = None
        self._checksum_lock = threading.Lock()
        # Checksums in the same byte layout a push uses, so "did the weights change?" is one compare.
        self.initial_checksum = state_checksum(backend.state_dict())
        self._checksum = self.initial_checksum

    def serving_checksum(self) -> str:
        with self._checksum_lock:
            return self._checksum

    def close(self) -> None:
        self.membership.drop()

    # ---- checks shared by every way in ----------------------------------------------------------
    def _authorize(self, context) -> None:
        header = dict(context.invocation_metadata()).get("authorization")
        if not bearer_ok(header, self.token):
            metrics.WEIGHT_PUSHES.labels("unauthenticated").inc()
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

    def _refusal(self, manifest: pb.Manifest) -> tuple[grpc.StatusCode, str, str] | None:
        """(status, outcome, reason) if this version must be refused before looking at its bytes."""
        if manifest.run_id != self.run_id:
            return (grpc.StatusCode.FAILED_PRECONDITION, "other_run",
                    f"push for run {manifest.run_id!r}, this server serves run {self.run_id!r}")
        serving = self.backend.version
        if manifest.version < serving:
            return (grpc.StatusCode.FAILED_PRECONDITION, "refused_old",
                    f"version {manifest.version} is older than the serving version {serving}")
        return None

    def _already_serving(self, manifest: pb.Manifest) -> pb.PushReply | None:
        """A retried push of the serving version: acknowledge without staging anything."""
        if manifest.version == self.backend.version:
            metrics.WEIGHT_PUSHES.labels("already_serving").inc()
            return pb.PushReply(version=manifest.version, swapped=False, checksum=self.serving_checksum())
        return None

    def _admit(self, manifest: pb.Manifest, context) -> pb.PushReply | None:
        refusal = self._refusal(manifest)
        if refusal is not None:
            self._abort(context, refusal)
        return self._already_serving(manifest)

    @staticmethod
    def _abort(context, refusal: tuple[grpc.StatusCode, str, str]) -> None:
        status, outcome, reason = refusal
        metrics.WEIGHT_PUSHES.labels(outcome).inc()
        context.abort(status, reason)

    @contextlib.contextmanager
    def _one_transfer(self, context):
        """Hold the staging buffer; wait for another transfer at most until this call's deadline."""
        remaining = context.time_remaining()
        if not self._stage_lock.acquire(timeout=-1 if remaining is None else max(0.0, remaining)):
            metrics.WEIGHT_PUSHES.labels("busy").inc()
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "another push was being staged until the deadline")
        metrics.WEIGHT_TRANSFER_ACTIVE.set(1)
        try:
            yield
        finally:
            metrics.WEIGHT_TRANSFER_ACTIVE.set(0)
            self._stage_lock.release()

    def _staging_buffer(self, nbytes: int, device: torch.device) -> torch.Tensor:
        if device.type != "cpu":  # GPU memory is too dear to keep a second copy of the model around
            return torch.empty(nbytes, dtype=torch.uint8, device=device)
        if self._staging is None or self._staging.numel() < nbytes:
            self._staging = None  # free the old one before allocating the larger one
            self._staging = torch.empty(nbytes, dtype=torch.uint8)
        return self._staging

    def _swap(self, manifest: pb.Manifest, state: dict[str, torch.Tensor], checksum: str, started: float,
              context) -> pb.PushReply:
        stage_s = time.perf_counter() - started
        swap_started = time.perf_counter()
        if not self.backend.swap_weights(state, manifest.version):
            self._abort(context, (grpc.StatusCode.FAILED_PRECONDITION, "refused_old",
                                  f"version {manifest.version} is not newer than the serving version "
                                  f"{self.backend.version}"))
        swap_s = time.perf_counter() - swap_started
        with self._checksum_lock:
            self._checksum = checksum
        metrics.SWAP_SECONDS.observe(swap_s)
        metrics.WEIGHT_PUSHES.labels("ok").inc()
        metrics.VERSION.set(manifest.version)
        log.info("now serving version %d (%d bytes staged in %.2fs, swapped in %.2fs)", manifest.version,
                 manifest.total_bytes, stage_s, swap_s)
        return pb.PushReply(version=manifest.version, swapped=True, checksum=checksum,
                            stage_seconds=stage_s, swap_seconds=swap_s)

    # ---- gRPC path --------------------------------------------------------------------------------
    def Push(self, request_iterator, context):
        self._authorize(context)
        started = time.perf_counter()
        try:
            manifest = decode_push_message(next(request_iterator, b""))
        except WeightSyncError:
            manifest = None
        if not isinstance(manifest, pb.Manifest):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a push must start with its manifest")
        done = self._admit(manifest, context)
        if done is not None:
            return done
        with self._one_transfer(context):
            done = self._admit(manifest, context)  # a concurrent push may have moved the version on
            if done is not None:
                return done
            try:
                check_manifest(manifest, self.backend.weight_specs())
                staged = StagedPush(manifest, self._staging_buffer(flat_offsets(manifest.tensors)[1],
                                                                   torch.device("cpu")))
                for raw in request_iterator:
                    chunk = decode_push_message(raw)
                    if not isinstance(chunk, ChunkView):
                        raise WeightSyncError("a second manifest inside one push")
                    staged.add(chunk)
                state = staged.finish()
            except WeightSyncError as exc:
                if context.is_active():
                    self._abort(context, (grpc.StatusCode.INVALID_ARGUMENT, "invalid", str(exc)))
                self._broke_off(manifest, context)
            except grpc.RpcError:
                self._broke_off(manifest, context)
            return self._swap(manifest, state, manifest.checksum, started, context)

    def _broke_off(self, manifest: pb.Manifest, context) -> None:
        """The pusher went away mid-stream (its iterator failed or just ended): nothing was swapped."""
        log.warning("push of version %d broke off; still serving version %d", manifest.version, self.backend.version)
        self._abort(context, (grpc.StatusCode.CANCELLED, "broken", "the push stream broke off"))

    # ---- collective path ----------------------------------------------------------------------------
    def Prepare(self, manifest, context):
        """Would this server take the version? Checked before the learner forms a group."""
        self._authorize(context)
        done = self._admit(manifest, context)
        if done is not None:
            return pb.PrepareReply(serving_version=done.version, needed=False)
        try:
            check_manifest(manifest, self.backend.weight_specs())
        except WeightSyncError as exc:
            self._abort(context, (grpc.StatusCode.INVALID_ARGUMENT, "invalid", str(exc)))
        return pb.PrepareReply(serving_version=self.backend.version, needed=True)

    def Receive(self, request, context):
        """Join the announced group, receive the broadcast into staging, verify, swap, acknowledge.

        Once named in a group this server takes part in the whole broadcast even if it will refuse
        the version (the others cannot finish without every rank); it decides after the bytes.
        """
        self._authorize(context)
        manifest, group = request.manifest, request.group
        if manifest.run_id != self.run_id:
            self._abort(context, self._refusal(manifest))
        if not (0 < group.rank < group.world_size) or group.backend not in ("gloo", "nccl") \
                or request.bucket_bytes <= 0 or request.timeout_s <= 0:
            self._abort(context, (grpc.StatusCode.INVALID_ARGUMENT, "invalid",
                                  f"bad group announcement: rank {group.rank} of {group.world_size}, backend "
                                  f"{group.backend!r}, bucket {request.bucket_bytes}, timeout {request.timeout_s}"))
        started = time.perf_counter()
        with self._one_transfer(context):
            try:
                check_manifest(manifest, self.backend.weight_specs())
                fits = self._refusal(manifest) is None and manifest.version != self.backend.version
            except WeightSyncError:
                fits = False
            device = torch.device("cpu") if group.backend == "gloo" else torch.device("cuda", torch.cuda.current_device())
            staged = StagedPush(manifest, self._staging_buffer(flat_offsets(manifest.tensors)[1], device)) \
                if fits else None
            checksum = self._take_part(request, staged, context)
            if staged is None:
                return self._refuse_drained(manifest, context)
            try:
                state = staged.finish(checksum)
            except WeightSyncError as exc:
                self._abort(context, (grpc.StatusCode.INVALID_ARGUMENT, "invalid", str(exc)))
            return self._swap(manifest, state, checksum, started, context)

    def _take_part(self, request: pb.ReceiveRequest, staged: StagedPush | None, context) -> str | None:
        """Join the group and receive every broadcast into `staged` (or drain them when None), on a
        worker thread, giving up at the announced deadline or when the learner calls it off; returns
        the checksum the learner sent last."""
        manifest, group = request.manifest, request.group

        def transfer() -> str | None:
            member = self.membership.join(group.store_host, group.store_port, group.group_id, group.rank,
                                          group.world_size, group.backend, request.timeout_s)
            if staged is None:
                return drain_flat(member, manifest.tensors, request.bucket_bytes, request.contiguous)
            return receive_flat(member, staged, request.bucket_bytes, request.contiguous)

        called_off = threading.Event()
        context.add_callback(called_off.set)  # the learner cancels the call when its broadcast failed
        try:
            return run_with_deadline(transfer, request.timeout_s, f"receive of version {manifest.version}",
                                     on_timeout=self.membership.drop, cancelled=called_off)
        except CollectiveError as exc:
            self.membership.drop()
            if staged is not None and staged.flat.device.type == "cpu":
                self._staging = None  # an abandoned broadcast may still write into it
            log.warning("collective receive of version %d failed: %s; still serving version %d",
                        manifest.version, exc, self.backend.version)
            self._abort(context, (grpc.StatusCode.UNAVAILABLE, "collective_failed", str(exc)))

    def _refuse_drained(self, manifest: pb.Manifest, context) -> pb.PushReply:
        """The answer for a version drained rather than staged: the same checks as a gRPC push."""
        done = self._admit(manifest, context)
        if done is not None:
            return done
        try:
            check_manifest(manifest, self.backend.weight_specs())
        except WeightSyncError as exc:
            self._abort(context, (grpc.StatusCode.INVALID_ARGUMENT, "invalid", str(exc)))
        self._abort(context, (grpc.StatusCode.FAILED_PRECONDITION, "refused_old", "version refused"))

    def GetVersion(self, request, context):
        return pb.VersionReply(version=self.backend.version, checksum=self.serving_checksum())


SERVICE = pb.DESCRIPTOR.services_by_name["WeightSync"].full_name


def method_handlers(servicer: WeightSyncServicer) -> dict[str, grpc.RpcMethodHandler]:
    """The generated registration (weights_pb2_grpc.add_WeightSyncServicer_to_server), except that
    Push takes its messages as the raw bytes that `decode_push_message` reads without copying."""
    return {
        "Push": grpc.stream_unary_rpc_method_handler(
            servicer.Push, request_deserializer=None, response_serializer=pb.PushReply.SerializeToString),
        "Prepare": grpc.unary_unary_rpc_method_handler(
            servicer.Prepare, request_deserializer=pb.Manifest.FromString,
            response_serializer=pb.PrepareReply.SerializeToString),
        "Receive": grpc.unary_unary_rpc_method_handler(
            servicer.Receive, request_deserializer=pb.ReceiveRequest.FromString,
            response_serializer=pb.PushReply.SerializeToString),
        "GetVersion": grpc.unary_unary_rpc_method_handler(
            servicer.GetVersion, request_deserializer=pb.VersionRequest.FromString,
            response_serializer=pb.VersionReply.SerializeToString),
    }


def start_server(servicer: WeightSyncServicer, host: str, port: int,
                 credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.Server, int]:
    """Serve WeightSync on host:port (0: a free port), with TLS when `credentials` are given."""
    # Workers: concurrent pushes, a Prepare or GetVersion beside a long Receive, and spare.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, method_handlers(servicer)),))
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind the weight-sync port {address}")
    server.start()
    return server, bound
