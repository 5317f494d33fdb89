"""Collective weight sync: the learner (rank 0) broadcasts a version's flat bytes in buckets to the
rollout servers that joined its process group.

The group is a torch.distributed process group of its own — gloo for CPU tensors, NCCL for GPU
tensors, the same code — built from the learner's TCPStore under a per-group key prefix. It never
touches torch.distributed's global state, so it lives beside DeepSpeed's default group.

Control plane (the authenticated gRPC WeightSync service, see proto/weights.proto):
- Announce: the learner sends every target `Prepare(manifest)`; a server that would refuse the
  version (another run, older, a manifest that does not fit its model) says so here, before any
  group forms, so one misconfigured server cannot stall the others.
- Join: the learner sends `Receive` (manifest, bucket size, store address, group id, rank) to those
  that accepted. Ranks follow the sorted addresses; the learner is rank 0. The broadcasts follow
  `broadcast_plan(manifest, bucket_bytes, contiguous)` over the manifest's flat layout
  (`mmupt.weights.flat_offsets`), so the manifest and two fields announce them fully. The
  checksum is not in this manifest: the root computes it while sending and broadcasts it last.
  A member keeps its group while the group id stays the same, so a steady set of servers
  rendezvouses once; a new set gets a new id and a new group.
- Death: collectives block (NCCL ones forever), so each side runs them on a worker thread and its
  control side gives up at the deadline (`run_with_deadline`). When the learner gives up, it calls
  off the members' Receive calls, which makes them give up too (aborting a group does not reach the
  other ranks); the group is dropped on every side, members keep their last good version (nothing is
  swapped before the bytes verify), and the learner retries the failed servers with a fresh group.
  A failed member that does not even answer a version query is a suspect: it is synced in a group of
  its own from then on, until it succeeds. A gloo op that was abandoned ends by itself at the group's
  timeout, set to the same deadline; the staging buffer it might still write to is never reused.
"""
from __future__ import annotations

import datetime
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .weights import CHECKSUM_BYTES, StagedPush, flat_offsets, new_checksum

log = logging.getLogger(__name__)

# Broadcasts go straight from each tensor's own memory: packing costs a memory copy, and memory
# writes are the scarce resource on the dev VM (1 GB packed into 32-256 MB buckets: 0.8-1.6 GB/s;
# sent in place: 2.0-2.3 GB/s). Only tensors smaller than this are packed, with their neighbours.
DIRECT_MIN_BYTES = 64 * 1024
# Broadcasts in flight at once, on as many gloo worker threads: that hides the per-operation latency
# of the ~180 broadcasts of a 1 GB model (2 processes on the dev VM: 1.6 GB/s with gloo's default 2
# threads one at a time, 2.0 with 8 threads 8 deep, 2.3 with 16 threads 16 deep).
PIPELINE_DEPTH = 16
GLOO_THREADS = 16


class CollectiveError(RuntimeError):
    """A broadcast (or joining its group) failed; the group is unusable."""


class DeadlineExceeded(CollectiveError):
    pass


def run_with_deadline(job: Callable[[], object], timeout_s: float, what: str,
                      on_timeout: Callable[[], None] | None = None, cancelled: threading.Event | None = None):
    """Run `job` on a worker thread and wait at most `timeout_s` for it, from this (control) thread.

    On timeout, or when `cancelled` is set, `on_timeout` runs (abort the group) and the wait ends
    (DeadlineExceeded, CollectiveError); the worker is a daemon thread left to end when its
    collective fails.
    """
    outcome: dict[str, object] = {}

    def work():
        try:
            outcome["value"] = job()
        except BaseException as exc:  # noqa: BLE001 (re-raised on the control thread)
            outcome["error"] = exc

    worker = threading.Thread(target=work, name=f"collective-{what}", daemon=True)
    worker.start()
    deadline = time.monotonic() + timeout_s
    while worker.is_alive():
        left = deadline - time.monotonic()
        if left <= 0 or (cancelled is not None and cancelled.is_set()):
            if on_timeout is not None:
                on_timeout()
            if left <= 0:
                raise DeadlineExceeded(f"{what} did not finish within {timeout_s:.1f}s")
            raise CollectiveError(f"{what} was called off")
        worker.join(min(left, 0.05))
    if "error" in outcome:
        error = outcome["error"]
        if isinstance(error, CollectiveError):
            raise error
        raise CollectiveError(f"{what} failed: {type(error).__name__}: {error}") from error
    return outcome.get("value")


def start_store(port: int, timeout_s: float) -> dist.TCPStore:
    """The learner's rendezvous store (listens on all interfaces; port 0 picks a free one)."""
    return dist.TCPStore("0.0.0.0", port, None, True, datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def connect_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(host, port, None, False, datetime.timedelta(seconds=timeout_s))


def resolve_backend(setting: str) -> str:
    if setting == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return setting


class BroadcastGroup:
    """One member's handle on a broadcast group. Building it is the rendezvous: it blocks until every
    rank has joined (or the timeout passes)."""

    def __init__(self, store: dist.Store, group_id: str, rank: int, world_size: int, backend: str,
                 timeout_s: float):
        self.group_id, self.rank, self.world_size, self.backend = group_id, rank, world_size, backend
        prefixed = dist.PrefixStore(f"mmupt/weights/{group_id}/", store)
        timeout = datetime.timedelta(seconds=timeout_s)
        if backend == "gloo":
            self.device = torch.device("cpu")
            options = dist.ProcessGroupGloo._Options()  # the only way to set the thread count
            options._timeout = timeout
            options._devices = [dist.ProcessGroupGloo.create_default_device()]
            options._threads = GLOO_THREADS
            self.pg = dist.ProcessGroupGloo(prefixed, rank, world_size, options)
        elif backend == "nccl":  # written for GPU hosts; not exercised on the CPU-only dev machines
            self.device = torch.device("cuda", torch.cuda.current_device())
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
        else:
            raise ValueError(f"unknown collective backend {backend!r}")

    def broadcast(self, tensor: torch.Tensor):
        """Start broadcasting `tensor` from rank 0; returns the work handle to wait on."""
        options = dist.BroadcastOptions()
        options.rootRank = 0
        return self.pg.broadcast([tensor], options)

    def abort(self) -> None:
        """Break the group on this side. It does not reach the other ranks (measured with gloo): their
        own deadline, or the learner calling off their Receive, ends their part."""
        try:
            self.pg.abort()
        except Exception as exc:  # noqa: BLE001 (best effort: the group is being dropped anyway)
            log.debug("abort of group %s: %s", self.group_id, exc)


@dataclass(frozen=True)
class Op:
    """One broadcast: it fills [start, end) of the flat layout (`mmupt.weights.flat_offsets`)."""
    start: int
    end: int
    tensor: int | None  # the one tensor sent in place, or None for a bucket packed from several


def broadcast_plan(specs, bucket_bytes: int, contiguous: bool = False) -> list[Op]:
    """The broadcasts of a version, computed the same way on every rank from the manifest, the
    bucket size and whether the root holds the version contiguously in the flat layout (then: plain
    slices of bucket_bytes). Otherwise big tensors go in place, in pieces of at most bucket_bytes,
    and runs of small ones are packed into buckets of at most bucket_bytes."""
    offsets, flat_bytes = flat_offsets(specs)
    if contiguous:
        return [Op(lo, min(lo + bucket_bytes, flat_bytes), None) for lo in range(0, flat_bytes, bucket_bytes)]
    ops: list[Op] = []
    run: list[int] = []  # [start, end) of the bucket being packed

    def close_run():
        if run:
            ops.append(Op(run[0], run[1], None))
            run.clear()

    for index, (spec, offset) in enumerate(zip(specs, offsets)):
        size = spec.nbytes
        if size >= min(DIRECT_MIN_BYTES, bucket_bytes):
            close_run()
            ops.extend(Op(offset + lo, offset + min(lo + bucket_bytes, size), index)
                       for lo in range(0, size, bucket_bytes))
        elif size:
            if run and offset + size - run[0] > bucket_bytes:
                close_run()
            run[:] = [run[0] if run else offset, offset + size]
    close_run()
    return ops


class PackBuffers:
    """One reusable buffer per pipeline slot for packed buckets (a fresh allocation per push costs
    page faults). Slot k % PIPELINE_DEPTH is free again once broadcast k - PIPELINE_DEPTH is done."""

    def __init__(self, device: torch.device):
        self.device = device
        self._slots: list[torch.Tensor | None] = [None] * PIPELINE_DEPTH

    def get(self, k: int, nbytes: int) -> torch.Tensor:
        slot = k % PIPELINE_DEPTH
        buffer = self._slots[slot]
        if buffer is None or buffer.numel() < nbytes:
            buffer = self._slots[slot] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return buffer[:nbytes]


def send_flat(group: BroadcastGroup, payload: list[torch.Tensor], specs, bucket_bytes: int,
              buffers: PackBuffers, flat: torch.Tensor | None = None) -> str:
    """Root: broadcast a version's bytes (`payload`, uint8 per tensor in manifest order) by the plan,
    then their checksum as one last small broadcast; returns the checksum (hex).

    `flat`: the buffer that holds `payload` contiguously in the flat layout (a WireBuffer), whose
    slices are broadcast as they are. The checksum is computed here, while earlier broadcasts are on
    the wire, rather than in a pass before the first one (which cost ~20% of the transfer on the dev
    VM). Padding between tensors is not cleared: receivers never read it.
    """
    offsets, _ = flat_offsets(specs)
    digest, hashed = new_checksum(), 0  # tensors [0, hashed) are in the digest
    in_flight: deque = deque()
    for k, op in enumerate(broadcast_plan(specs, bucket_bytes, contiguous=flat is not None)):
        if len(in_flight) >= PIPELINE_DEPTH:
            in_flight.popleft().wait()
        if flat is not None:
            source = flat[op.start:op.end]
        elif op.tensor is not None:
            base = offsets[op.tensor]
            source = payload[op.tensor][op.start - base:op.end - base]
        else:
            source = buffers.get(k, op.end - op.start)
            for index, (base, spec) in enumerate(zip(offsets, specs)):
                if base >= op.end:
                    break
                if spec.nbytes and base >= op.start:
                    source[base - op.start:base - op.start + spec.nbytes].copy_(payload[index])
        in_flight.append(group.broadcast(source.to(group.device)))
        while hashed < len(specs) and offsets[hashed] + specs[hashed].nbytes <= op.end:
            digest.update(payload[hashed].numpy())
            hashed += 1
    for data in payload[hashed:]:  # trailing zero-byte tensors
        digest.update(data.numpy())
    in_flight.append(group.broadcast(torch.tensor(list(digest.digest()), dtype=torch.uint8).to(group.device)))
    while in_flight:
        in_flight.popleft().wait()
    return digest.hexdigest()


def receive_flat(group: BroadcastGroup, staged: StagedPush, bucket_bytes: int, contiguous: bool = False) -> str:
    """Member: receive every broadcast straight into its place in the staging buffer, checksumming
    each one as it completes while the later ones are still on the wire; returns the checksum the
    root sent last (hex), for `staged.finish` to compare."""
    in_flight: deque = deque()
    for op in broadcast_plan(staged.manifest.tensors, bucket_bytes, contiguous):
        if len(in_flight) >= PIPELINE_DEPTH:
            end, work = in_flight.popleft()
            work.wait()
            staged.absorb(end)
        in_flight.append((op.end, group.broadcast(staged.flat[op.start:op.end])))
    trailer = torch.empty(CHECKSUM_BYTES, dtype=torch.uint8, device=group.device)
    in_flight.append((staged.flat.numel(), group.broadcast(trailer)))  # the end also covers trailing empty tensors
    while in_flight:
        end, work = in_flight.popleft()
        work.wait()
        staged.absorb(end)
    return bytes(trailer.cpu().tolist()).hex()


def drain_flat(group: BroadcastGroup, specs, bucket_bytes: int, contiguous: bool = False) -> None:
    """Member that will refuse the version: take part in every broadcast (the others need every
    rank) into one scratch buffer, keeping nothing."""
    plan = broadcast_plan(specs, bucket_bytes, contiguous)
    biggest = max([op.end - op.start for op in plan] + [CHECKSUM_BYTES])
    scratch = torch.empty(biggest, dtype=torch.uint8, device=group.device)
    for op in plan:
        group.broadcast(scratch[:op.end - op.start]).wait()
    group.broadcast(scratch[:CHECKSUM_BYTES]).wait()


class GroupMembership:
    """A rollout server's side: the one group it belongs to, kept while the learner reuses its id."""

    def __init__(self):
        self._group: BroadcastGroup | None = None
        self._store: tuple[tuple[str, int], dist.TCPStore] | None = None
        self._lock = threading.Lock()

    def join(self, store_host: str, store_port: int, group_id: str, rank: int, world_size: int,
             backend: str, timeout_s: float) -> BroadcastGroup:
        """The group with this id, joining it (a rendezvous with every other member) if new."""
        with self._lock:
            group = self._group
            if group is not None and (group.group_id, group.rank, group.world_size) == (group_id, rank, world_size):
                return group
            self._drop_locked()
            address = (store_host, store_port)
            if self._store is None or self._store[0] != address:
                self._store = (address, connect_store(store_host, store_port, timeout_s))
            store = self._store[1]
        group = BroadcastGroup(store, group_id, rank, world_size, backend, timeout_s)
        with self._lock:
            self._group = group
        log.info("joined weight-sync group %s as rank %d of %d (%s)", group_id, rank, world_size, backend)
        return group

    def drop(self) -> None:
        with self._lock:
            self._drop_locked()

    def _drop_locked(self) -> None:
        if self._group is not None:
            self._group.abort()
            self._group = None
