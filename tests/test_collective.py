"""Collective weight sync on the CPU with gloo across 3 processes: this test process is the learner
(rank 0, the broadcast root) and two subprocesses are rollout receivers.

The receivers are the real WeightSync service over the real tiny model (tests/weight_receiver.py),
or bare group members (tests/collective_peer.py) where a test needs a peer that hangs mid-broadcast.
"""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from mmupt.collective import (DIRECT_MIN_BYTES, BroadcastGroup, DeadlineExceeded, PackBuffers, broadcast_plan,
                              run_with_deadline, send_flat, start_store)
from mmupt.services.learner import metrics
from mmupt.services.learner.weight_push import CollectivePusher
from mmupt._proto import weights_pb2_grpc as pb_grpc
from mmupt.weights import build_manifest, flat_offsets, push_messages

TOKEN, RUN = "s3cret", "run-c"
HERE = Path(__file__).parent


class Receiver:
    """A weight_receiver.py process: the WeightSync service over the tiny model."""

    def __init__(self, model_dir):
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "weight_receiver.py"), "--model", str(model_dir), "--token", TOKEN,
             "--run-id", RUN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.address = None

    def wait_ready(self) -> str:
        line = self.proc.stdout.readline()
        assert line.startswith("port "), f"receiver did not start: {line!r}"
        self.address = f"127.0.0.1:{line.split()[1]}"
        return self.address

    def served(self, path: Path) -> dict[str, torch.Tensor]:
        """The weights it serves now, read back from the process."""
        self.proc.stdin.write(f"dump {path}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "dumped"
        return load_file(path)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def receivers(tiny_model_dir):
    started = [Receiver(tiny_model_dir) for _ in range(2)]
    try:
        for receiver in started:
            receiver.wait_ready()
        yield started
    finally:
        for receiver in started:
            receiver.stop()


@pytest.fixture(scope="module")
def base_state(tiny_model_dir):
    from mmupt.model import load_model
    from mmupt.config import ModelSettings

    return {k: v.detach().clone() for k, v in load_model(ModelSettings(path=str(tiny_model_dir), device="cpu"))
            .state_dict().items()}


@pytest.fixture(scope="module")
def pusher():
    # A small bucket, so even the tiny model travels in many buckets.
    pusher = CollectivePusher(TOKEN, RUN, timeout_s=20, bucket_bytes=64 * 1024, backend="gloo",
                              retries=1, retry_backoff_s=0.1, prepare_timeout_s=1.0)
    yield pusher
    pusher.close()


class Versions:
    """Each test pushes versions above the last one (the receivers live for the whole module)."""
    current = 0

    @classmethod
    def next(cls) -> int:
        cls.current += 1
        return cls.current


def perturbed(state, delta):
    return {k: v + delta if v.is_floating_point() else v.clone() for k, v in state.items()}


def assert_serves(receiver, state, tmp_path, cast=None):
    served = receiver.served(tmp_path / f"{receiver.proc.pid}.safetensors")
    assert served.keys() == state.keys()
    for name, tensor in state.items():
        want = tensor.to(cast).to(tensor.dtype) if cast is not None and tensor.is_floating_point() else tensor
        assert torch.equal(served[name], want), name


def test_broadcast_plan_covers_every_byte_once_with_big_tensors_in_place():
    direct, bucket = DIRECT_MIN_BYTES, 16 * DIRECT_MIN_BYTES
    sizes = {"small1": 1000, "big": 3 * bucket + 5, "empty": 0, "small2": direct // 2, "small3": direct // 4,
             "mid": direct, "small4": 100, "tail": 8}
    state = {name: torch.zeros(n, dtype=torch.uint8) for name, n in sizes.items()}
    manifest, _ = build_manifest(state, 1, RUN)
    offsets, flat_bytes = flat_offsets(manifest.tensors)
    plan = broadcast_plan(manifest.tensors, bucket)
    assert all(op.end - op.start <= bucket for op in plan)
    assert all(a.end <= b.start for a, b in zip(plan, plan[1:]))  # in layout order, no overlap
    for index, spec in enumerate(manifest.tensors):  # every tensor byte is in exactly one broadcast
        lo, hi = offsets[index], offsets[index] + spec.nbytes
        covered = sum(min(hi, op.end) - max(lo, op.start) for op in plan if op.start < hi and op.end > lo)
        assert covered == spec.nbytes, spec.name
    names = list(sizes)
    in_place = [names[op.tensor] for op in plan if op.tensor is not None]
    assert in_place == ["big"] * 4 + ["mid"]  # big ones straight from their memory, the biggest in 4 pieces
    assert len(plan) - len(in_place) == 3  # packed: small1 | small2 + small3 | small4 + tail
    assert plan[-1].end <= flat_bytes
    # A sender holding the version contiguously sends plain slices of the whole layout.
    slices = broadcast_plan(manifest.tensors, bucket, contiguous=True)
    assert [(op.start, op.end) for op in slices] == [(lo, min(lo + bucket, flat_bytes)) for lo in range(0, flat_bytes, bucket)]


def test_broadcast_reaches_both_receivers_bit_for_bit_and_keeps_the_group(receivers, pusher, base_state, tmp_path):
    addresses = [r.address for r in receivers]
    version = Versions.next()
    state = perturbed(base_state, 0.01)
    results = pusher.push(state, version, addresses)
    assert [(r.ok, r.version) for r in results] == [(True, version)] * 2, results
    for receiver in receivers:
        assert_serves(receiver, state, tmp_path)
    group_id = pusher.group_id(addresses)
    assert group_id is not None

    version = Versions.next()
    state = perturbed(base_state, 0.02)
    assert all(r.ok for r in pusher.push(state, version, addresses))
    assert pusher.group_id(addresses) == group_id  # the same members: no new rendezvous
    for receiver in receivers:
        assert pusher.serving_version(receiver.address) == version
        assert_serves(receiver, state, tmp_path)


def test_bf16_on_the_wire_is_cast_to_the_receivers_dtype(receivers, pusher, base_state, tmp_path):
    addresses = [r.address for r in receivers]
    state = perturbed(base_state, 0.03)
    pusher.wire_dtype = "bfloat16"
    try:
        results = pusher.push(state, Versions.next(), addresses)
    finally:
        pusher.wire_dtype = None
    assert all(r.ok for r in results), results
    assert pusher.wire.flat is not None  # sent from the cast buffer, as plain slices of the layout
    manifest, _ = build_manifest(state, 0, RUN, "bfloat16")
    assert manifest.total_bytes * 2 == build_manifest(state, 0, RUN)[0].total_bytes  # half the bytes
    for receiver in receivers:
        assert_serves(receiver, state, tmp_path, cast=torch.bfloat16)


def test_refusals_come_before_any_group_forms(receivers, pusher, base_state):
    addresses = [r.address for r in receivers]
    serving = Versions.current
    started = time.monotonic()
    old = pusher.push(perturbed(base_state, 0.5), serving - 1, addresses)
    assert all(not r.ok and "older" in r.detail and not r.retryable for r in old), old
    bad = dict(base_state)
    name = next(iter(bad))
    bad[name] = torch.zeros(3, 3)
    mismatched = pusher.push(bad, Versions.next(), addresses)
    assert all(not r.ok and "shape" in r.detail for r in mismatched), mismatched
    assert time.monotonic() - started < 5  # refused at Prepare: nobody waited for a rendezvous
    again = pusher.push(perturbed(base_state, 0.5), serving, addresses)  # the serving version: idempotent
    assert [(r.ok, r.version) for r in again] == [(True, serving)] * 2
    assert all(pusher.serving_version(a) == serving for a in addresses)


def test_a_stopped_receiver_does_not_hold_back_the_other_and_catches_up(receivers, pusher, base_state, tmp_path):
    healthy, stuck = receivers
    addresses = [healthy.address, stuck.address]
    failures_before = metrics.PUSH_FAILURES.labels(stuck.address)._value.get()
    os.kill(stuck.proc.pid, signal.SIGSTOP)
    try:
        version = Versions.next()
        state = perturbed(base_state, 0.04)
        started = time.monotonic()
        results = pusher.push(state, version, addresses)
        assert time.monotonic() - started < pusher.timeout_s
    finally:
        os.kill(stuck.proc.pid, signal.SIGCONT)
    by_server = {r.server: r for r in results}
    assert by_server[healthy.address].ok and by_server[healthy.address].version == version
    assert not by_server[stuck.address].ok and "DEADLINE_EXCEEDED" in by_server[stuck.address].detail
    assert stuck.address in pusher.suspects
    assert metrics.PUSH_FAILURES.labels(stuck.address)._value.get() == failures_before + 1
    assert pusher.serving_version(stuck.address) < version  # it kept its last good version
    assert_serves(healthy, state, tmp_path)

    # Resumed, it is synced again (in its own group, after the healthy one) and leaves the suspects.
    version = Versions.next()
    state = perturbed(base_state, 0.05)
    assert all(r.ok for r in pusher.push(state, version, addresses))
    assert stuck.address not in pusher.suspects
    for receiver in receivers:
        assert_serves(receiver, state, tmp_path)


def test_a_receiver_that_hangs_after_accepting_is_isolated_and_catches_up(receivers, pusher, base_state, tmp_path):
    """It accepts the version (Prepare), then hangs before taking part: the learner gives up at the
    deadline, the receiver becomes a suspect, and the next version reaches both."""
    healthy, stuck = receivers
    addresses = [healthy.address, stuck.address]
    # Hold the stuck receiver's staging buffer with a gRPC push that stalls after its manifest, so that
    # its Receive waits; then stop the process, so that it cannot even answer.
    manifest, payload = build_manifest(perturbed(base_state, 0.5), Versions.next(), RUN)
    release = threading.Event()

    def stalled():
        messages = push_messages(manifest, payload, 4096)
        yield next(messages)
        yield next(messages)
        release.wait(60)

    stub = pb_grpc.WeightSyncStub(grpc.insecure_channel(stuck.address))
    holding = stub.Push.future(stalled(), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=120)
    time.sleep(2)
    version, state = Versions.next(), perturbed(base_state, 0.06)
    pusher.timeout_s = 4
    outcome = {}
    push = threading.Thread(target=lambda: outcome.update(results=pusher.push(state, version, addresses)))
    try:
        started = time.monotonic()
        push.start()
        time.sleep(2)
        os.kill(stuck.proc.pid, signal.SIGSTOP)
        release.set()
        push.join(30)
        assert time.monotonic() - started < pusher.timeout_s + 3  # the learner was not held up
    finally:
        os.kill(stuck.proc.pid, signal.SIGCONT)
        pusher.timeout_s = 20
    by_server = {r.server: r for r in outcome["results"]}
    assert not by_server[stuck.address].ok and "DEADLINE_EXCEEDED" in by_server[stuck.address].detail
    assert stuck.address in pusher.suspects and healthy.address not in pusher.suspects
    with pytest.raises(grpc.RpcError):
        holding.result(timeout=30)  # the stalled push was refused (it ended early), nothing swapped
    version, state = Versions.next(), perturbed(base_state, 0.07)
    assert all(r.ok for r in pusher.push(state, version, addresses))
    assert not pusher.suspects
    for receiver in receivers:
        assert_serves(receiver, state, tmp_path)


def test_a_peer_hung_mid_broadcast_fails_the_sync_at_the_deadline(tmp_path):
    """Root, a healthy member and a member that joins and then hangs: 3 processes, real gloo."""
    torch.manual_seed(0)
    state = {"big": torch.randn(16 * 1024 * 1024), "small": torch.randn(7)}  # 64 MiB: more than socket buffers hold
    manifest, payload = build_manifest(state, 1, RUN)
    manifest_file = tmp_path / "manifest.pb"
    manifest_file.write_bytes(manifest.SerializeToString())
    store = start_store(0, 30)
    bucket = 4 * 1024 * 1024
    peer = [sys.executable, str(HERE / "collective_peer.py"), str(store.port), str(manifest_file), str(bucket), "6"]
    healthy = subprocess.Popen(peer + ["g1:1:3", "g2:1:2"], stdout=subprocess.PIPE, text=True)
    hung = subprocess.Popen(peer + ["g1:2:3:hang"], stdout=subprocess.PIPE, text=True)
    buffers = PackBuffers(torch.device("cpu"))
    try:
        assert healthy.stdout.readline().strip() == "ready" and hung.stdout.readline().strip() == "ready"
        live = {}

        def broadcast(group_id, world_size):
            live["group"] = BroadcastGroup(store, group_id, 0, world_size, "gloo", 30)
            send_flat(live["group"], payload, manifest.tensors, bucket, buffers)

        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            run_with_deadline(lambda: broadcast("g1", 3), 3.0, "broadcast",
                              lambda: live["group"].abort() if "group" in live else None)
        assert "group" in live and time.monotonic() - started < 4.0  # joined, then given up on: not stuck
        assert hung.stdout.readline().strip() == "hung"
        assert healthy.stdout.readline().startswith("error")  # it gave up at its own deadline

        # A fresh group without the hung peer works, with fresh buffers (the old ones may still be in use).
        buffers = PackBuffers(torch.device("cpu"))
        run_with_deadline(lambda: broadcast("g2", 2), 20.0, "broadcast")
        assert healthy.stdout.readline().split() == ["ok", manifest.checksum]  # verified against what was sent
    finally:
        for proc in (healthy, hung):
            proc.kill()
            proc.wait()
