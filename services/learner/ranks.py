"""Several learner ranks in lockstep: rank 0 decides, every rank runs the same operation.

Only rank 0 talks to Redis. Before any operation that runs collectives (training on a batch,
exporting weights, saving or loading a checkpoint), rank 0 broadcasts the operation's name and
arguments, then runs it itself; the other ranks sit in `serve()`, receive the same message and run
the same handler, so every rank walks the same sequence of collectives. Messages are msgpack bytes
in a uint8 tensor broadcast: nothing executable crosses between ranks (no pickle, no *_object_list).
With one rank every call runs locally and nothing is broadcast.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import msgpack
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
# Rank 0 may wait for data a long time; a message at least this often keeps the others' broadcast
# (and its process-group timeout) from expiring.
KEEPALIVE_S = 60.0
STOP, PING = "stop", "ping"


def comm_device() -> torch.device:
    """Tensors in collectives live where the backend wants them (NCCL: this rank's GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_bytes(data: bytes | None) -> bytes:
    """Rank 0's `data` on every rank: its length, then its bytes, as tensor broadcasts."""
    device = comm_device()
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    if data is not None:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if data else \
            torch.empty(0, dtype=torch.uint8, device=device)
    else:
        buf = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(buf, src=0)
    return data if data is not None else buf.cpu().numpy().tobytes()


class Lockstep:
    """Named operations that rank 0 runs on every rank. Arguments must be msgpack types."""

    def __init__(self, handlers: dict[str, Callable[..., Any]]):
        self.handlers = handlers
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self._last_sent = time.monotonic()
        self._stopped = False

    def _send(self, op: str, kwargs: dict) -> None:
        if self.world > 1:
            broadcast_bytes(msgpack.packb({"op": op, "kwargs": kwargs}, use_bin_type=True))
            self._last_sent = time.monotonic()

    def call(self, op: str, **kwargs) -> Any:
        """On rank 0: run `op` on every rank; returns rank 0's result."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 calls operations; the other ranks serve()")
        self._send(op, kwargs)
        return self.handlers[op](**kwargs)

    def keepalive(self) -> None:
        if self.world > 1 and time.monotonic() - self._last_sent >= KEEPALIVE_S:
            self._send(PING, {})

    def stop(self) -> None:
        """Release the other ranks from serve(); safe to call twice."""
        if self.rank == 0 and not self._stopped:
            self._stopped = True
            self._send(STOP, {})

    def serve(self) -> None:
        """On ranks > 0: run what rank 0 calls until it says stop."""
        log.info("rank %d/%d following rank 0", self.rank, self.world)
        while True:
            message = msgpack.unpackb(broadcast_bytes(None), raw=False)
            op = message["op"]
            if op == STOP:
                return
            if op != PING:
                self.handlers[op](**message["kwargs"])
