"""Weight-sync payloads shared by the learner (sender) and rollout servers (receiver).

A version travels as a manifest (every tensor's name, wire dtype, shape, byte size, and a checksum
over all tensor bytes in manifest order) followed by the bytes: gRPC chunks (name, offset, data) in
manifest order, or the buckets of a collective broadcast. The receiver stages everything in one flat
buffer laid out by `flat_offsets` (manifest order, each tensor at a 64-byte aligned offset, so every
dtype can be viewed in place) and verifies it fully before anything touches the serving model.

The checksum is xxh3-128: it catches corrupted, torn or misassembled pushes at ~18 GB/s, where
sha256 (1.6 GB/s on the dev VM) would be slower than the wire. It is an integrity check, not a
signature: who may push is decided by the token (and TLS) on the gRPC channel.

With a wire dtype (e.g. bfloat16, half the bytes) floating-point tensors are cast before sending;
the receiver's swap casts them to the model's dtype.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
import xxhash

from ._proto import weights_pb2 as pb

DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ALIGN = 64  # bytes; every tensor starts at a multiple of this in the flat layout


class WeightSyncError(ValueError):
    """A push that cannot be applied; the message says why (sent back to the pusher)."""


CHECKSUM_BYTES = 16


def new_checksum():
    return xxhash.xxh3_128()


def wire_tensor(t: torch.Tensor, wire_dtype: str | None = None) -> torch.Tensor:
    """The tensor as it travels: on the CPU, contiguous, floating point cast to the wire dtype."""
    t = t.detach()
    if wire_dtype is not None and t.is_floating_point() and t.dtype != DTYPES[wire_dtype]:
        t = t.to(DTYPES[wire_dtype])
    return t.to("cpu").contiguous()


def byte_tensor(t: torch.Tensor) -> torch.Tensor:
    """Zero-copy 1-D uint8 view of a contiguous CPU tensor's bytes (little-endian)."""
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def build_manifest(state: dict[str, torch.Tensor], version: int, run_id: str, wire_dtype: str | None = None,
                   checksum: bool = True) -> tuple[pb.Manifest, list[torch.Tensor]]:
    """The manifest of `state` and each tensor's wire bytes (uint8 views, zero-copy without a cast).
    `checksum=False` leaves the checksum out, for a sender that computes it while sending."""
    payload, specs, digest = [], [], new_checksum()
    for name, tensor in state.items():
        wire = wire_tensor(tensor, wire_dtype)
        if wire.dtype not in DTYPE_NAMES:
            raise WeightSyncError(f"{name}: dtype {wire.dtype} cannot be sent")
        data = byte_tensor(wire)
        specs.append(pb.TensorSpec(name=name, dtype=DTYPE_NAMES[wire.dtype], shape=list(wire.shape),
                                   nbytes=data.numel()))
        if checksum:
            digest.update(data.numpy())
        payload.append(data)
    manifest = pb.Manifest(version=version, tensors=specs, total_bytes=sum(d.numel() for d in payload),
                           checksum=digest.hexdigest() if checksum else "", run_id=run_id)
    return manifest, payload


def state_checksum(state: dict[str, torch.Tensor], wire_dtype: str | None = None) -> str:
    """Checksum of a state dict in the byte layout a push of it would carry."""
    digest = new_checksum()
    for tensor in state.values():
        digest.update(byte_tensor(wire_tensor(tensor, wire_dtype)).numpy())
    return digest.hexdigest()


def flat_offsets(specs) -> tuple[list[int], int]:
    """Each tensor's offset in the flat staging layout, and the layout's size."""
    offsets, position = [], 0
    for spec in specs:
        offsets.append(position)
        position += -(-spec.nbytes // ALIGN) * ALIGN
    return offsets, position


class WireBuffer:
    """The sender's reused flat buffer for a version that needs a cast (`wire_dtype`).

    Casting into fresh tensors on every push costs page faults (seconds per GB on the dev VM); here
    the casts land in one buffer, kept between pushes, at the flat layout's offsets, which also makes
    the whole version one contiguous range that a collective can broadcast in a few big slices.
    """

    def __init__(self):
        self.flat: torch.Tensor | None = None

    def cast(self, state: dict[str, torch.Tensor], wire_dtype: str) -> dict[str, torch.Tensor]:
        """`state` in the wire dtype (floating point only), as views of this buffer in manifest order."""
        shapes = [(name, t.shape, DTYPES[wire_dtype] if t.is_floating_point() else t.dtype) for name, t in state.items()]
        specs = [pb.TensorSpec(nbytes=int(np.prod(shape, dtype=np.int64)) * dtype.itemsize) for _, shape, dtype in shapes]
        offsets, size = flat_offsets(specs)
        if self.flat is None or self.flat.numel() < size:
            self.flat = None  # free the old one first
            self.flat = torch.empty(size, dtype=torch.uint8)
        out = {}
        for (name, shape, dtype), spec, offset in zip(shapes, specs, offsets):
            view = self.flat[offset:offset + spec.nbytes].view(dtype).reshape(shape) if spec.nbytes \
                else torch.empty(shape, dtype=dtype)
            view.copy_(state[name].detach())
            out[name] = view
        return out

    def holds(self, payload: list[torch.Tensor], specs) -> bool:
        """True if `payload` lies in this buffer exactly at the flat layout's offsets."""
        if self.flat is None:
            return False
        base = self.flat.data_ptr()
        offsets, size = flat_offsets(specs)
        return size <= self.flat.numel() and all(
            d.numel() == 0 or d.data_ptr() == base + o for d, o in zip(payload, offsets))


def push_messages(manifest: pb.Manifest, payload: list[torch.Tensor], chunk_bytes: int) -> Iterator[pb.PushMessage]:
    """A gRPC push: the manifest, then every tensor's bytes in chunks, in manifest order."""
    yield pb.PushMessage(manifest=manifest)
    for spec, data in zip(manifest.tensors, payload):
        view = memoryview(data.numpy())
        # max(..., 1): a zero-byte tensor still gets one (empty) chunk, so the receiver sees it.
        for offset in range(0, max(view.nbytes, 1), chunk_bytes):
            yield pb.PushMessage(chunk=pb.Chunk(name=spec.name, offset=offset,
                                                data=bytes(view[offset:offset + chunk_bytes])))


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Protobuf tags (field number << 3 | wire type) of PushMessage.chunk and Chunk's fields.
_TAG_CHUNK, _TAG_NAME, _TAG_OFFSET, _TAG_DATA = b"\x12", b"\x0a", b"\x10", b"\x1a"


def encoded_push(manifest: pb.Manifest, payload: list[torch.Tensor], chunk_bytes: int) -> Iterator[bytes]:
    """`push_messages`, already serialized, for a channel that sends bytes as they are.

    Chunks are framed by hand around a view of the tensor bytes: one copy where building and
    serializing protobuf objects makes three, which cost a quarter of the gRPC path's throughput on
    the dev VM. The bytes are standard protobuf (the server parses them with the generated code;
    tests/test_weight_sync.py checks they decode to exactly `push_messages`).
    """
    yield pb.PushMessage(manifest=manifest).SerializeToString()
    for spec, data in zip(manifest.tensors, payload):
        view, name = memoryview(data.numpy()), spec.name.encode()
        for offset in range(0, max(view.nbytes, 1), chunk_bytes):
            part = view[offset:offset + chunk_bytes]
            head = (_TAG_NAME + _varint(len(name)) + name + (_TAG_OFFSET + _varint(offset) if offset else b"")
                    + _TAG_DATA + _varint(part.nbytes))
            yield b"".join((_TAG_CHUNK, _varint(len(head) + part.nbytes), head, part))


class ChunkView(NamedTuple):
    """A chunk as the server decodes it: `data` is a view into the received message, not a copy."""
    name: str
    offset: int
    data: memoryview


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise WeightSyncError("malformed push message: a truncated or oversized varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of a protobuf message: ints for varints, views for length-delimited."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 2:
            size, pos = _read_varint(buf, pos)
            if pos + size > len(buf):
                raise WeightSyncError("malformed push message: a field runs past the end")
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (1, 5):  # fixed 64 / 32 bits: not in our messages, skipped like any unknown field
            value, pos = None, pos + (8 if wire == 1 else 4)
        else:
            raise WeightSyncError(f"malformed push message: wire type {wire}")
        yield field, value
    if pos != len(buf):
        raise WeightSyncError("malformed push message: a field runs past the end")


def decode_push_message(raw: bytes) -> pb.Manifest | ChunkView:
    """Parse one serialized PushMessage, keeping a chunk's data as a view of `raw`.

    The generated parser would copy the data twice (into its arena, then into a bytes object), which
    cost a third of the receiving side's CPU. This reads the same protobuf encoding (any field order,
    unknown fields skipped); tests/test_weight_sync.py checks it against the generated code.
    """
    kinds = [(field, value) for field, value in _fields(memoryview(raw)) if field in (1, 2)]
    if len(kinds) != 1 or not isinstance(kinds[0][1], memoryview):
        raise WeightSyncError("malformed push message: it must hold exactly one manifest or one chunk")
    field, body = kinds[0]
    if field == 1:
        return pb.Manifest.FromString(bytes(body))
    name, offset, data = b"", 0, memoryview(b"")
    for number, value in _fields(body):
        if number == 1 and isinstance(value, memoryview):
            name = bytes(value)
        elif number == 2 and isinstance(value, int):
            offset = value
        elif number == 3 and isinstance(value, memoryview):
            data = value
    return ChunkView(name.decode(), offset, data)


def check_manifest(manifest: pb.Manifest, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """Refuse a manifest whose names, shapes, dtypes or sizes do not fit the model, with the reason."""
    names = [s.name for s in manifest.tensors]
    if len(set(names)) != len(names):
        raise WeightSyncError("manifest names a tensor twice")
    missing, unknown = set(expected) - set(names), set(names) - set(expected)
    if missing or unknown:
        raise WeightSyncError(f"manifest does not match the model: missing {sorted(missing)[:5]}, "
                              f"unknown {sorted(unknown)[:5]}")
    total = 0
    for spec in manifest.tensors:
        if spec.dtype not in DTYPES:
            raise WeightSyncError(f"{spec.name}: unsupported dtype {spec.dtype!r}")
        shape, (model_shape, model_dtype) = tuple(spec.shape), expected[spec.name]
        if shape != tuple(model_shape):
            raise WeightSyncError(f"{spec.name}: shape {list(shape)} does not match the model's {list(model_shape)}")
        wire_dtype = DTYPES[spec.dtype]
        # Floating point may travel in another float dtype (the swap casts); anything else must match.
        if wire_dtype != model_dtype and not (wire_dtype.is_floating_point and model_dtype.is_floating_point):
            raise WeightSyncError(f"{spec.name}: dtype {spec.dtype} cannot load into the model's {model_dtype}")
        want = int(np.prod(shape, dtype=np.int64)) * wire_dtype.itemsize
        if spec.nbytes != want:
            raise WeightSyncError(f"{spec.name}: {spec.nbytes} bytes declared, {want} expected")
        total += spec.nbytes
    if total != manifest.total_bytes:
        raise WeightSyncError("manifest total_bytes does not add up")


class StagedPush:
    """Receiver side: stage one version's bytes in a flat buffer, verify them, hand out tensors.

    Bytes arrive in manifest order, either as gRPC chunks (`add`) or written in place by a collective
    broadcast (`absorb`). `finish` checks that every byte arrived and the checksum matches, and
    returns the tensors as views of the flat buffer (the caller's swap copies them into the model).
    """

    def __init__(self, manifest: pb.Manifest, flat: torch.Tensor):
        self.manifest = manifest
        self._specs = list(manifest.tensors)
        self.offsets, size = flat_offsets(self._specs)
        if flat.dtype != torch.uint8 or flat.numel() < size:
            raise ValueError(f"staging buffer too small: {flat.numel()} bytes for {size}")
        self.flat = flat[:size]
        self._host = self.flat.numpy() if self.flat.device.type == "cpu" else None  # gRPC chunks land here
        self._index = 0          # the tensor the stream is on
        self._offset = 0         # the next byte expected inside it
        self._digest = new_checksum()

    def _host_bytes(self, start: int, end: int):
        part = self.flat[start:end]
        return part.numpy() if part.device.type == "cpu" else part.cpu().numpy()

    def add(self, chunk: pb.Chunk | ChunkView) -> None:
        """One gRPC chunk: it must be the next piece of the tensor the stream is on."""
        if self._index >= len(self._specs) or chunk.name != self._specs[self._index].name:
            raise WeightSyncError(f"chunk for {chunk.name!r} out of manifest order")
        size = self._specs[self._index].nbytes
        if chunk.offset != self._offset or self._offset + len(chunk.data) > size:
            raise WeightSyncError(f"chunk for {chunk.name!r} at offset {chunk.offset} does not fit "
                                  f"(expected offset {self._offset}, tensor size {size})")
        start = self.offsets[self._index] + self._offset
        self._host[start:start + len(chunk.data)] = np.frombuffer(chunk.data, dtype=np.uint8)
        self._digest.update(chunk.data)
        self._offset += len(chunk.data)
        if self._offset == size:
            self._index, self._offset = self._index + 1, 0

    def absorb(self, end: int) -> None:
        """The flat buffer up to `end` has been written in place: take in the tensor bytes before it."""
        while self._index < len(self._specs):
            start, size = self.offsets[self._index], self._specs[self._index].nbytes
            lo, hi = start + self._offset, min(start + size, end)
            if hi < lo:
                return
            if hi > lo:
                self._digest.update(self._host_bytes(lo, hi))
                self._offset += hi - lo
            if self._offset < size:
                return
            self._index, self._offset = self._index + 1, 0

    def finish(self, checksum: str | None = None) -> dict[str, torch.Tensor]:
        """Verify every byte arrived and the checksum (the manifest's, or the one given when it came
        after the bytes) matches; return the staged tensors."""
        if self._index < len(self._specs):
            raise WeightSyncError(f"push ended early: {len(self._specs) - self._index} tensors incomplete "
                                  f"(at {self._specs[self._index].name!r})")
        if self._digest.hexdigest() != (checksum or self.manifest.checksum):
            raise WeightSyncError("checksum mismatch: the pushed bytes differ from the manifest")
        out = {}
        for spec, offset in zip(self._specs, self.offsets):
            dtype, shape = DTYPES[spec.dtype], tuple(spec.shape)
            if spec.nbytes == 0:
                out[spec.name] = torch.empty(shape, dtype=dtype, device=self.flat.device)
            else:
                out[spec.name] = self.flat[offset:offset + spec.nbytes].view(dtype).reshape(shape)
        return out
