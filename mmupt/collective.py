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
  that accepted. Ranks follow the sorted addresses; the learner is rank 0. The bucket layout is the
  manifest's flat layout (`mmupt.weights.flat_offsets`) cut every `bucket_bytes`, so the manifest and
  one number announce it fully. A member keeps its group while the group id stays the same, so a
  steady set of servers rendezvouses once; a new set gets a new id and a new group.
- Death: collectives block (NCCL ones forever), so each side runs them on a worker thread and its
  control side gives up at the deadline (`run_with_deadline`): the group is aborted and dropped on
  every side, members keep their last good version (nothing is swapped before the bytes verify),
  and the learner retries the failed servers with a fresh group. A gloo op that was abandoned ends
  by itself at the group's timeout, set to the same deadline; the staging buffer it might still
  write to is never reused.
"""
from __future__ import annotations

import datetime
import logging
import threading
from collections import deque
from collections.abc import Callable

import torch
import torch.distributed as dist

from .weights import StagedPush

log = logging.getLogger(__name__)


class CollectiveError(RuntimeError):
    """A broadcast (or joining its group) failed; the group is unusable."""


class DeadlineExceeded(CollectiveError):
    pass


def run_with_deadline(job: Callable[[], object], timeout_s: float, what: str,
                      on_timeout: Callable[[], None] | None = None):
    """Run `job` on a worker thread and wait at most `timeout_s` for it, from this (control) thread.

    On timeout `on_timeout` runs (abort the group) and DeadlineExceeded is raised; the worker is a
    daemon thread left to end when its collective fails.
    """
    outcome: dict[str, object] = {}

    def work():
        try:
            outcome["value"] = job()
        except BaseException as exc:  # noqa: BLE001 (re-raised on the control thread)
            outcome["error"] = exc

    worker = threading.Thread(target=work, name=f"collective-{what}", daemon=True)
    worker.start()
    worker.join(max(0.0, timeout_s))
    if worker.is_alive():
        if on_timeout is not None:
            on_timeout()
        raise DeadlineExceeded(f"{what} did not finish within {timeout_s:.1f}s")
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
            self.pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
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
        """Break the group: pending and future collectives on it fail rather than wait."""
        try:
            self.pg.abort()
        except Exception as exc:  # noqa: BLE001 (best effort: the group is being dropped anyway)
            log.debug("abort of group %s: %s", self.group_id, exc)


def bucket_ranges(flat_bytes: int, bucket_bytes: int) -> list[tuple[int, int]]:
    return [(start, min(start + bucket_bytes, flat_bytes)) for start in range(0, flat_bytes, bucket_bytes)]


def send_flat(group: BroadcastGroup, payload: list[torch.Tensor], offsets: list[int], flat_bytes: int,
              bucket_bytes: int, buffers: list[torch.Tensor]) -> None:
    """Root: pack the tensors' bytes into buckets of the flat layout and broadcast them.

    Two bucket buffers alternate, so packing bucket k+1 overlaps the broadcast of bucket k. Padding
    between tensors is not cleared: receivers never read it.
    """
    pieces = sorted(zip(offsets, payload), key=lambda item: item[0])
    pending: list = [None, None]
    index = 0  # first tensor that may overlap the current bucket
    for k, (start, end) in enumerate(bucket_ranges(flat_bytes, bucket_bytes)):
        slot = k % 2
        if pending[slot] is not None:
            pending[slot].wait()
        bucket = buffers[slot][:end - start]
        while index < len(pieces) and pieces[index][0] + pieces[index][1].numel() <= start:
            index += 1
        j = index
        while j < len(pieces) and pieces[j][0] < end:
            offset, data = pieces[j]
            lo, hi = max(start, offset), min(end, offset + data.numel())
            if hi > lo:
                bucket[lo - start:hi - start].copy_(data[lo - offset:hi - offset])
            j += 1
        pending[slot] = group.broadcast(bucket)
    for work in pending:
        if work is not None:
            work.wait()


def receive_flat(group: BroadcastGroup, staged: StagedPush, bucket_bytes: int) -> None:
    """Member: receive every bucket straight into its place in the staging buffer.

    The next bucket is posted before the current one is checksummed, so hashing overlaps the wire.
    """
    ranges = bucket_ranges(staged.flat.numel(), bucket_bytes)
    posted: deque = deque()
    for k, (start, end) in enumerate(ranges):
        posted.append((end, group.broadcast(staged.flat[start:end])))
        if k + 1 < len(ranges) and len(posted) < 2:
            continue
        done_end, work = posted.popleft()
        work.wait()
        staged.absorb(done_end)
    while posted:
        done_end, work = posted.popleft()
        work.wait()
        staged.absorb(done_end)


def drain_flat(group: BroadcastGroup, flat_bytes: int, bucket_bytes: int) -> None:
    """Member that will refuse the version: take part in the broadcast (the others need every rank)
    into one scratch bucket, keeping nothing."""
    scratch = torch.empty(min(bucket_bytes, max(flat_bytes, 1)), dtype=torch.uint8, device=group.device)
    for start, end in bucket_ranges(flat_bytes, bucket_bytes):
        group.broadcast(scratch[:end - start]).wait()


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
