"""gRPC weight sync against a real server holding the tiny model."""
import grpc
import pytest
import torch

from mmupt._proto import weights_pb2 as pb
from mmupt._proto import weights_pb2_grpc as pb_grpc
from mmupt.config import ModelSettings
from mmupt.services.learner.weight_push import WeightPusher
from mmupt.services.rollout.hf_backend import TransformersBackend
from mmupt.services.rollout.weight_server import WeightSyncServicer, start_server
from mmupt.weights import build_manifest, push_messages

TOKEN, RUN = "s3cret", "run-a"


@pytest.fixture
def server(tiny_model_dir):
    backend = TransformersBackend(ModelSettings(path=str(tiny_model_dir), device="cpu"))
    servicer = WeightSyncServicer(backend, TOKEN, RUN)
    grpc_server, port = start_server(servicer, "127.0.0.1", 0)
    yield backend, servicer, f"127.0.0.1:{port}"
    grpc_server.stop(0)


def perturbed(backend, delta=0.01):
    return {k: v.detach().clone() + delta for k, v in backend.state_dict().items()}


def test_full_push_changes_served_weights_bit_for_bit(server):
    backend, servicer, address = server
    state = perturbed(backend)
    pusher = WeightPusher(TOKEN, RUN, chunk_bytes=4096, timeout_s=30)
    [result] = pusher.push(state, 1, [address])
    assert result.ok and result.version == 1 and backend.version == 1
    for name, tensor in backend.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert servicer.serving_checksum() != servicer.initial_checksum
    assert pusher.serving_version(address) == 1


def test_wrong_token_is_refused(server):
    backend, _, address = server
    [result] = WeightPusher("wrong", RUN, 4096, 30).push(perturbed(backend), 1, [address])
    assert not result.ok and "UNAUTHENTICATED" in result.detail and backend.version == 0


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
    before = {k: v.clone() for k, v in backend.state_dict().items()}
    state = perturbed(backend)
    name = next(iter(state))
    state[name] = torch.zeros(3, 3)
    [result] = WeightPusher(TOKEN, RUN, 4096, 30).push(state, 1, [address])
    assert not result.ok and "shape" in result.detail
    assert backend.version == 0 and all(torch.equal(before[k], v) for k, v in backend.state_dict().items())


def test_truncated_push_leaves_last_good_version(server):
    backend, _, address = server
    before = {k: v.clone() for k, v in backend.state_dict().items()}
    manifest, views = build_manifest(perturbed(backend), 1, RUN)
    messages = list(push_messages(manifest, views, 4096))[:-3]  # the stream ends early
    stub = pb_grpc.WeightSyncStub(grpc.insecure_channel(address))
    with pytest.raises(grpc.RpcError) as info:
        stub.Push(iter(messages), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ended early" in info.value.details()
    assert backend.version == 0 and all(torch.equal(before[k], v) for k, v in backend.state_dict().items())


def test_corrupted_bytes_fail_the_checksum(server):
    backend, _, address = server
    manifest, views = build_manifest(perturbed(backend), 1, RUN)
    messages = list(push_messages(manifest, views, 4096))
    chunk = messages[1].chunk
    messages[1] = pb.PushMessage(chunk=pb.Chunk(name=chunk.name, offset=chunk.offset,
                                                data=bytes([chunk.data[0] ^ 1]) + chunk.data[1:]))
    stub = pb_grpc.WeightSyncStub(grpc.insecure_channel(address))
    with pytest.raises(grpc.RpcError, match="checksum"):
        stub.Push(iter(messages), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=30)
    assert backend.version == 0


def test_push_for_another_run_is_refused(server):
    backend, _, address = server
    [result] = WeightPusher(TOKEN, "run-b", 4096, 30).push(perturbed(backend), 1, [address])
    assert not result.ok and "FAILED_PRECONDITION" in result.detail
