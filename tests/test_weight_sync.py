"""gRPC weight sync against a real server holding the tiny model."""
import datetime
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from mmupt._proto import weights_pb2 as pb
from mmupt._proto import weights_pb2_grpc as pb_grpc
from mmupt.auth import channel_credentials, server_credentials
from mmupt.config import AuthSettings, ConfigError, ModelSettings, load_settings
from mmupt.services.learner import metrics as learner_metrics
from mmupt.services.learner.weight_push import WeightPusher
from mmupt.services.rollout import metrics as rollout_metrics
from mmupt.services.rollout.hf_backend import TransformersBackend
from mmupt.services.rollout.weight_server import WeightSyncServicer, method_handlers, start_server
from mmupt.weights import (ChunkView, WeightSyncError, WireBuffer, build_manifest, decode_push_message, encoded_push,
                           push_messages)

TOKEN, RUN = "s3cret", "run-a"
HERE = Path(__file__).parent
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture
def server(tiny_model_dir):
    backend = TransformersBackend(ModelSettings(path=str(tiny_model_dir), device="cpu"))
    servicer = WeightSyncServicer(backend, TOKEN, RUN)
    grpc_server, port = start_server(servicer, "127.0.0.1", 0)
    yield backend, servicer, f"127.0.0.1:{port}"
    grpc_server.stop(0)


def perturbed(backend, delta=0.01):
    return {k: v.detach().clone() + delta for k, v in backend.state_dict().items()}


def snapshot(backend):
    return {k: v.clone() for k, v in backend.state_dict().items()}


def serves(backend, state) -> bool:
    return all(torch.equal(tensor, state[name]) for name, tensor in backend.state_dict().items())


@pytest.mark.parametrize("chunk_bytes", [4096, 300_000])
def test_encoded_push_is_the_protobuf_encoding_of_push_messages(chunk_bytes):
    state = {"big": torch.randn(400_000), "empty": torch.empty(0, 4), "ids": torch.arange(10), "one": torch.ones(())}
    manifest, payload = build_manifest(state, 7, RUN)
    encoded = list(encoded_push(manifest, payload, chunk_bytes))
    assert [pb.PushMessage.FromString(b) for b in encoded] == list(push_messages(manifest, payload, chunk_bytes))


def test_the_servers_decoder_reads_what_protobuf_writes():
    state = {"big": torch.randn(5000), "empty": torch.empty(0), "ids": torch.arange(10)}
    manifest, payload = build_manifest(state, 3, RUN)
    messages = list(push_messages(manifest, payload, 4096))
    assert decode_push_message(messages[0].SerializeToString()) == manifest
    for message in messages[1:]:
        chunk = message.chunk
        assert decode_push_message(message.SerializeToString()) == ChunkView(chunk.name, chunk.offset, chunk.data)
    # Any field order and unknown fields (varint, fixed32, length-delimited) are fine, as for protobuf.
    body = b"\x1a\x03abc" + b"\x28\x07" + b"\x35\x00\x00\x00\x00" + b"\x10\x80\x20" + b"\x0a\x01w" + b"\x3a\x01z"
    raw = b"\x12" + bytes([len(body)]) + body
    parsed = pb.PushMessage.FromString(raw).chunk
    assert (parsed.name, parsed.offset, parsed.data) == ("w", 4096, b"abc")
    assert decode_push_message(raw) == ChunkView("w", 4096, b"abc")
    for bad in (b"", raw[:-1], raw + raw, b"\x12\x05ab"):  # empty, truncated, two chunks, too short
        with pytest.raises(WeightSyncError, match="malformed"):
            decode_push_message(bad)


def test_wire_buffer_casts_into_one_reused_flat_layout():
    state = {"w": torch.randn(100, 3), "ids": torch.arange(7), "empty": torch.empty(0), "b": torch.randn(5)}
    wire = WireBuffer()
    cast = wire.cast(state, "bfloat16")
    assert cast["w"].dtype == torch.bfloat16 and cast["ids"].dtype == torch.int64  # only floats are cast
    assert all(torch.equal(cast[k], v.to(cast[k].dtype)) for k, v in state.items())
    manifest, payload = build_manifest(cast, 1, RUN)
    assert wire.holds(payload, manifest.tensors)  # the whole version is one contiguous flat range
    before = wire.flat.data_ptr()
    wire.cast({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, "bfloat16")
    assert wire.flat.data_ptr() == before  # reused, not reallocated
    assert not wire.holds(build_manifest(state, 1, RUN)[1], manifest.tensors)


def test_every_rpc_of_the_service_is_served(server):
    _, servicer, _ = server
    assert set(method_handlers(servicer)) == set(pb.DESCRIPTOR.services_by_name["WeightSync"].methods_by_name)


def test_full_push_changes_served_weights_bit_for_bit(server):
    backend, servicer, address = server
    state = perturbed(backend)
    pusher = WeightPusher(TOKEN, RUN, chunk_bytes=4096, timeout_s=30)
    [result] = pusher.push(state, 1, [address])
    assert result.ok and result.version == 1 and backend.version == 1
    assert serves(backend, state)
    assert servicer.serving_checksum() != servicer.initial_checksum
    assert pusher.serving_version(address) == 1


def test_bf16_on_the_wire_is_cast_to_the_models_dtype(server):
    backend, _, address = server
    state = perturbed(backend, 0.001)
    [result] = WeightPusher(TOKEN, RUN, 4096, 30, wire_dtype="bfloat16").push(state, 1, [address])
    assert result.ok and backend.version == 1
    assert all(t.dtype == torch.float32 for t in backend.state_dict().values())
    assert serves(backend, {k: v.to(torch.bfloat16).to(torch.float32) for k, v in state.items()})
    assert not serves(backend, state)  # the rounding really happened: bf16 has 8 bits of mantissa


def test_wrong_token_is_refused(server):
    backend, _, address = server
    [result] = WeightPusher("wrong", RUN, 4096, 30).push(perturbed(backend), 1, [address])
    assert not result.ok and "UNAUTHENTICATED" in result.detail and backend.version == 0
    assert result.attempts == 1  # a refusal is not retried


def test_older_version_is_refused_and_same_version_is_idempotent(server):
    backend, _, address = server
    pusher = WeightPusher(TOKEN, RUN, 4096, 30)
    assert pusher.push(perturbed(backend), 2, [address])[0].ok
    [old] = pusher.push(perturbed(backend, 0.5), 1, [address])
    assert not old.ok and "older" in old.detail and backend.version == 2
    [same] = pusher.push(perturbed(backend, 0.5), 2, [address])
    assert same.ok and same.version == 2


def test_mismatched_manifest_is_refused_and_old_weights_stay(server):
    backend, _, address = server
    before = snapshot(backend)
    state = perturbed(backend)
    name = next(iter(state))
    state[name] = torch.zeros(3, 3)
    [result] = WeightPusher(TOKEN, RUN, 4096, 30).push(state, 1, [address])
    assert not result.ok and "shape" in result.detail
    assert backend.version == 0 and serves(backend, before)


def test_truncated_push_leaves_last_good_version(server):
    backend, _, address = server
    before = snapshot(backend)
    manifest, payload = build_manifest(perturbed(backend), 1, RUN)
    messages = list(push_messages(manifest, payload, 4096))[:-3]  # the stream ends early
    stub = pb_grpc.WeightSyncStub(grpc.insecure_channel(address))
    with pytest.raises(grpc.RpcError) as info:
        stub.Push(iter(messages), metadata=AUTH, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ended early" in info.value.details()
    assert backend.version == 0 and serves(backend, before)


def test_push_killed_mid_stream_leaves_last_good_version(server, tiny_model_dir):
    backend, _, address = server
    before = snapshot(backend)
    def refused():  # a dead pusher shows as a broken stream, or (if gRPC sees a clean end first) a short one
        return sum(rollout_metrics.WEIGHT_PUSHES.labels(o)._value.get() for o in ("broken", "invalid"))

    before_refused = refused()
    pusher = subprocess.Popen([sys.executable, str(HERE / "slow_pusher.py"), address, TOKEN, RUN,
                               str(tiny_model_dir), "1"], stdout=subprocess.PIPE, text=True)
    try:
        assert pusher.stdout.readline().strip() == "streaming"
        deadline = time.monotonic() + 20
        while not rollout_metrics.WEIGHT_TRANSFER_ACTIVE._value.get():  # the server is staging it
            assert time.monotonic() < deadline, "the push never reached the server"
            time.sleep(0.01)
        pusher.send_signal(signal.SIGKILL)  # the learner dies mid-push
        pusher.wait(timeout=10)
        deadline = time.monotonic() + 20
        while rollout_metrics.WEIGHT_TRANSFER_ACTIVE._value.get():
            assert time.monotonic() < deadline, "the server did not notice the broken stream"
            time.sleep(0.05)
        assert refused() == before_refused + 1
    finally:
        pusher.kill()
    assert backend.version == 0 and serves(backend, before)
    state = perturbed(backend)  # and the next push goes through (nothing was left locked)
    assert WeightPusher(TOKEN, RUN, 4096, 30).push(state, 1, [address])[0].ok and serves(backend, state)


def test_corrupted_bytes_fail_the_checksum(server):
    backend, _, address = server
    manifest, payload = build_manifest(perturbed(backend), 1, RUN)
    messages = list(push_messages(manifest, payload, 4096))
    chunk = messages[1].chunk
    messages[1] = pb.PushMessage(chunk=pb.Chunk(name=chunk.name, offset=chunk.offset,
                                                data=bytes([chunk.data[0] ^ 1]) + chunk.data[1:]))
    stub = pb_grpc.WeightSyncStub(grpc.insecure_channel(address))
    with pytest.raises(grpc.RpcError, match="checksum"):
        stub.Push(iter(messages), metadata=AUTH, timeout=30)
    assert backend.version == 0


def test_push_for_another_run_is_refused(server):
    backend, _, address = server
    [result] = WeightPusher(TOKEN, "run-b", 4096, 30).push(perturbed(backend), 1, [address])
    assert not result.ok and "FAILED_PRECONDITION" in result.detail


@pytest.mark.parametrize("first", [1, 2])
def test_two_concurrent_pushes_end_with_the_newer_version_serving(server, first):
    backend, _, address = server
    states = {1: perturbed(backend, 0.1), 2: perturbed(backend, 0.2)}
    stub = pb_grpc.WeightSyncStub(grpc.insecure_channel(address))
    in_flight = threading.Event()
    outcomes = {}

    def push(version):
        manifest, payload = build_manifest(states[version], version, RUN)

        def stream():
            for i, message in enumerate(push_messages(manifest, payload, 4096)):
                yield message
                if i == 10 and version == first:
                    in_flight.set()  # the second push starts while this one is mid-stream
                time.sleep(0.001)
        try:
            outcomes[version] = stub.Push(stream(), metadata=AUTH, timeout=60).version
        except grpc.RpcError as exc:
            outcomes[version] = exc.details()

    threads = {v: threading.Thread(target=push, args=(v,)) for v in (1, 2)}
    threads[first].start()
    assert in_flight.wait(30)
    threads[3 - first].start()
    for thread in threads.values():
        thread.join(60)
    assert backend.version == 2 and serves(backend, states[2])
    assert outcomes[2] == 2
    assert outcomes[1] == 1 if first == 1 else "older" in outcomes[1]  # applied first, or refused as older


def test_failing_servers_are_retried_and_reported_without_blocking_the_learner(server):
    backend, _, good = server
    with socket.create_server(("127.0.0.1", 0)) as hung:  # accepts connections, never speaks HTTP/2
        hung_address = f"127.0.0.1:{hung.getsockname()[1]}"
        with socket.create_server(("127.0.0.1", 0)) as closed:
            dead_address = f"127.0.0.1:{closed.getsockname()[1]}"  # nobody listens there once closed
        before = {a: (learner_metrics.PUSH_RETRIES.labels(a)._value.get(),
                      learner_metrics.PUSH_FAILURES.labels(a)._value.get()) for a in (hung_address, dead_address)}
        pusher = WeightPusher(TOKEN, RUN, 4096, timeout_s=3, retries=2, retry_backoff_s=0.1)
        state = perturbed(backend)
        started = time.monotonic()
        results = {r.server: r for r in pusher.push(state, 1, [good, hung_address, dead_address])}
        assert time.monotonic() - started < 4.5  # the deadline bounds the whole push
    assert results[good].ok and serves(backend, state)
    assert not results[hung_address].ok and "DEADLINE_EXCEEDED" in results[hung_address].detail
    assert not results[dead_address].ok and "UNAVAILABLE" in results[dead_address].detail
    assert results[dead_address].attempts == 3  # tried, then retried twice
    assert learner_metrics.PUSH_RETRIES.labels(dead_address)._value.get() == before[dead_address][0] + 2
    for address in (hung_address, dead_address):
        assert learner_metrics.PUSH_FAILURES.labels(address)._value.get() == before[address][1] + 1
    assert learner_metrics.PUSH_FAILED_SERVERS._value.get() == 2


def self_signed(tmp_path: Path, name: str) -> AuthSettings:
    """A throw-away CA-less certificate for localhost / 127.0.0.1, made here."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return AuthSettings(tls_cert_file=str(cert_file), tls_key_file=str(key_file), tls_ca_file=str(cert_file))


def test_weight_sync_settings_are_checked_and_overridable():
    settings = load_settings(environ={"MMUPT_LEARNER__WEIGHT_SYNC": "collective", "MMUPT_WEIGHTS__BUCKET_BYTES": "1048576",
                                      "MMUPT_LEARNER__WIRE_DTYPE": "bfloat16"})
    assert settings.learner.weight_sync == "collective" and settings.weights.bucket_bytes == 1 << 20
    assert settings.learner.wire_dtype == "bfloat16"
    with pytest.raises(ConfigError, match=r"auth: .*tls_cert_file and tls_key_file go together"):
        load_settings(environ={}, overrides={"auth": {"tls_cert_file": "server.crt"}})
    with pytest.raises(ConfigError, match=r"weights\.collective_backend"):
        load_settings(environ={"MMUPT_WEIGHTS__COLLECTIVE_BACKEND": "mpi"})


def test_tls_push_with_a_self_signed_certificate(tiny_model_dir, tmp_path):
    auth, other = self_signed(tmp_path, "server"), self_signed(tmp_path, "other")
    backend = TransformersBackend(ModelSettings(path=str(tiny_model_dir), device="cpu"))
    grpc_server, port = start_server(WeightSyncServicer(backend, TOKEN, RUN), "127.0.0.1", 0, server_credentials(auth))
    address = f"127.0.0.1:{port}"
    try:
        state = perturbed(backend)
        [result] = WeightPusher(TOKEN, RUN, 4096, 30, credentials=channel_credentials(auth)).push(state, 1, [address])
        assert result.ok and serves(backend, state)
        # A learner that trusts another CA, or speaks plaintext, gets nowhere.
        [untrusted] = WeightPusher(TOKEN, RUN, 4096, 5, retries=0,
                                   credentials=channel_credentials(other)).push(perturbed(backend, 1), 2, [address])
        [plain] = WeightPusher(TOKEN, RUN, 4096, 5, retries=0).push(perturbed(backend, 1), 2, [address])
        assert not untrusted.ok and not plain.ok and backend.version == 1
    finally:
        grpc_server.stop(0)
