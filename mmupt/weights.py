"""Weight-sync payloads shared by the learner (sender) and rollout servers (receiver).

A push is a manifest (every tensor's name, wire dtype, shape, byte size, and a sha256 over all bytes
in manifest order) followed by chunks (name, offset, bytes) in manifest order. The receiver stages
everything and verifies it fully before anything touches the serving model.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import torch

from ._proto import weights_pb2 as pb

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class WeightSyncError(ValueError):
    """A push that cannot be applied; the message says why (sent back to the pusher)."""


def tensor_view(t: torch.Tensor, wire_dtype: str | None = None) -> memoryview:
    """Zero-copy little-endian bytes of a CPU tensor, cast to the wire dtype first if asked."""
    t = t.detach()
    if wire_dtype is not None and t.dtype != DTYPES[wire_dtype]:
        t = t.to(DTYPES[wire_dtype])
    t = t.to("cpu").contiguous()
    return memoryview(t.view(torch.uint8).numpy().reshape(-1))


def build_manifest(state: dict[str, torch.Tensor], version: int, run_id: str,
                   wire_dtype: str | None = None) -> tuple[pb.Manifest, list[memoryview]]:
    views, specs, digest = [], [], hashlib.sha256()
    for name, tensor in state.items():
        view = tensor_view(tensor, wire_dtype)
        dtype = wire_dtype or DTYPE_NAMES[tensor.dtype]
        specs.append(pb.TensorSpec(name=name, dtype=dtype, shape=list(tensor.shape), nbytes=view.nbytes))
        digest.update(view)
        views.append(view)
    manifest = pb.Manifest(version=version, tensors=specs, total_bytes=sum(v.nbytes for v in views),
                           sha256=digest.hexdigest(), run_id=run_id)
    return manifest, views


def state_checksum(state: dict[str, torch.Tensor], wire_dtype: str | None = None) -> str:
    digest = hashlib.sha256()
    for tensor in state.values():
        digest.update(tensor_view(tensor, wire_dtype))
    return digest.hexdigest()


def push_messages(manifest: pb.Manifest, views: list[memoryview], chunk_bytes: int) -> Iterator[pb.PushMessage]:
    yield pb.PushMessage(manifest=manifest)
    for spec, view in zip(manifest.tensors, views):
        # max(..., 1): a zero-byte tensor still gets one (empty) chunk, so the receiver sees it.
        for offset in range(0, max(view.nbytes, 1), chunk_bytes):
            yield pb.PushMessage(chunk=pb.Chunk(name=spec.name, offset=offset,
                                                data=bytes(view[offset:offset + chunk_bytes])))


class StagedPush:
    """Receiver side: check the manifest against the model, stage chunks, verify, build tensors."""

    def __init__(self, manifest: pb.Manifest, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        self.manifest = manifest
        self._check_manifest(expected)
        self._buffers = {s.name: bytearray(s.nbytes) for s in manifest.tensors}
        self._order = [s.name for s in manifest.tensors]
        self._index = 0          # which tensor the stream is on
        self._offset = 0         # next expected offset inside it
        self._digest = hashlib.sha256()

    def _check_manifest(self, expected) -> None:
        names = [s.name for s in self.manifest.tensors]
        if len(set(names)) != len(names):
            raise WeightSyncError("manifest names a tensor twice")
        missing, unknown = set(expected) - set(names), set(names) - set(expected)
        if missing or unknown:
            raise WeightSyncError(f"manifest does not match the model: missing {sorted(missing)[:5]}, "
                                  f"unknown {sorted(unknown)[:5]}")
        total = 0
        for spec in self.manifest.tensors:
            if spec.dtype not in DTYPES:
                raise WeightSyncError(f"{spec.name}: unsupported dtype {spec.dtype!r}")
            shape = tuple(spec.shape)
            if shape != tuple(expected[spec.name][0]):
                raise WeightSyncError(f"{spec.name}: shape {list(shape)} does not match the model's "
                                      f"{list(expected[spec.name][0])}")
            want = int(np.prod(shape, dtype=np.int64)) * DTYPES[spec.dtype].itemsize
            if spec.nbytes != want:
                raise WeightSyncError(f"{spec.name}: {spec.nbytes} bytes declared, {want} expected")
            total += spec.nbytes
        if total != self.manifest.total_bytes:
            raise WeightSyncError("manifest total_bytes does not add up")

    def add(self, chunk: pb.Chunk) -> None:
        if self._index >= len(self._order) or chunk.name != self._order[self._index]:
            raise WeightSyncError(f"chunk for {chunk.name!r} out of manifest order")
        buf = self._buffers[chunk.name]
        if chunk.offset != self._offset or self._offset + len(chunk.data) > len(buf):
            raise WeightSyncError(f"chunk for {chunk.name!r} at offset {chunk.offset} does not fit "
                                  f"(expected offset {self._offset}, tensor size {len(buf)})")
        buf[chunk.offset:chunk.offset + len(chunk.data)] = chunk.data
        self._digest.update(chunk.data)
        self._offset += len(chunk.data)
        if self._offset == len(buf):
            self._index, self._offset = self._index + 1, 0

    def finish(self) -> dict[str, torch.Tensor]:
        """Verify every byte arrived and the checksum matches; return the staged tensors."""
        if self._index < len(self._order):
            raise WeightSyncError(f"push ended early: {len(self._order) - self._index} tensors incomplete "
                                  f"(at {self._order[self._index]!r})")
        if self._digest.hexdigest() != self.manifest.sha256:
            raise WeightSyncError("checksum mismatch: the pushed bytes differ from the manifest")
        out = {}
        for spec in self.manifest.tensors:
            out[spec.name] = torch.frombuffer(self._buffers[spec.name], dtype=DTYPES[spec.dtype]) \
                .reshape(tuple(spec.shape)) if spec.nbytes else torch.empty(tuple(spec.shape), dtype=DTYPES[spec.dtype])
        return out
