"""Security measures (docs/security.md): every state-changing call needs the token, and no input is
ever deserialised into code.

- gRPC WeightSync: Push, Prepare and Receive refuse a missing, malformed or wrong token before
  looking at the request, and the served weights do not change; GetVersion is read-only.
- HTTP: an inventory of every route of every service. A route that changes state must refuse a
  request without the right token; a new route fails this test until it is classified.
- No pickle, no `eval`/`exec`, no unsafe YAML or `torch.load` anywhere in the code.
"""
from __future__ import annotations

import re
from pathlib import Path

import grpc
import httpx
import pytest

from mmupt._proto import weights_pb2 as pb
from mmupt._proto import weights_pb2_grpc as pb_grpc
from mmupt.config import ModelSettings, load_settings
from mmupt.services.rollout.api import RolloutServer, build_app
from mmupt.services.rollout.hf_backend import TransformersBackend
from mmupt.services.rollout.weight_server import WeightSyncServicer, start_server
from mmupt.weights import build_manifest, push_messages
from rollout_support import serving

TOKEN, RUN = "s3cret-token", "run-sec"
ROOT = Path(__file__).resolve().parents[1]
BAD_AUTH = {
    "missing": (),
    "wrong": (("authorization", "Bearer not-the-token"),),
    "no_scheme": (("authorization", TOKEN),),
    "prefix": (("authorization", f"Bearer {TOKEN[:-1]}"),),
    "suffix": (("authorization", f"Bearer {TOKEN}x"),),
}


@pytest.fixture
def weight_server(tiny_model_dir):
    backend = TransformersBackend(ModelSettings(path=str(tiny_model_dir), device="cpu"))
    grpc_server, port = start_server(WeightSyncServicer(backend, TOKEN, RUN), "127.0.0.1", 0)
    yield backend, pb_grpc.WeightSyncStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    grpc_server.stop(0)


@pytest.mark.parametrize("auth", sorted(BAD_AUTH))
def test_weight_sync_refuses_every_state_changing_call_without_the_right_token(weight_server, auth):
    backend, stub = weight_server
    state = {k: v + 0.5 for k, v in backend.state_dict().items()}
    before = {k: v.clone() for k, v in backend.state_dict().items()}
    manifest, payload = build_manifest(state, 1, RUN)
    calls = {
        "Push": lambda md: stub.Push(push_messages(manifest, payload, 1 << 20), metadata=md, timeout=30),
        "Prepare": lambda md: stub.Prepare(manifest, metadata=md, timeout=30),
        "Receive": lambda md: stub.Receive(pb.ReceiveRequest(manifest=manifest, bucket_bytes=1 << 20, timeout_s=5,
                                                             group=pb.GroupInfo(rank=1, world_size=2, backend="gloo")),
                                           metadata=md, timeout=30),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as info:
            call(BAD_AUTH[auth])
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, info.value.details())
    assert backend.version == 0
    assert all((backend.state_dict()[k] == v).all() for k, v in before.items())
    # Reading the version needs no token; pushing with the right one works.
    assert stub.GetVersion(pb.VersionRequest(), timeout=30).version == 0
    reply = stub.Push(push_messages(manifest, payload, 1 << 20), metadata=(("authorization", f"Bearer {TOKEN}"),),
                      timeout=60)
    assert reply.version == 1 and backend.version == 1


# Every non-GET route of every service, and whether it changes state. Generating (chat, rollout) and
# voting are computations: bounded by request limits and the queue, open like any inference API.
HTTP_ROUTES = {
    "rollout": {"POST /v1/chat/completions": "compute", "POST /v1/rollout": "compute", "POST /v1/eval": "state"},
    "voter": {"POST /v1/vote": "compute"},
    "learner": {},
}


def non_get_routes(app) -> set[str]:
    return {f"{method} {route.path}" for route in app.routes for method in getattr(route, "methods", ()) or ()
            if method not in ("GET", "HEAD")}


def test_every_http_route_is_classified_and_state_changing_ones_need_the_token(tiny_model_dir, tmp_path):
    from mmupt.services.learner.main import learner_app
    from mmupt.services.voter.grading import make_grader
    from mmupt.services.voter.main import vote_app

    settings = load_settings(environ={}, overrides={"model": {"path": str(tiny_model_dir), "device": "cpu"},
                                                    "rollout": {"allowed_local_dirs": [str(tmp_path)]}})
    server = RolloutServer(settings, TOKEN)
    server.attach(TransformersBackend(settings.model))
    rollout = build_app(server)
    learner_stub = type("L", (), {})()  # routes only: the app's handlers are not called here
    apps = {"rollout": rollout, "voter": vote_app(settings, make_grader("exact")), "learner": learner_app(learner_stub)}
    for name, app in apps.items():
        assert non_get_routes(app) == set(HTTP_ROUTES[name]), f"{name}: classify new routes in HTTP_ROUTES"

    bench = tmp_path / "bench.jsonl"
    bench.write_text('{"question": "?", "answer": "1", "image": ""}\n')
    with serving(rollout) as url:
        for route, kind in HTTP_ROUTES["rollout"].items():
            if kind != "state":
                continue
            path = route.split(" ", 1)[1]
            for header in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                reply = httpx.post(url + path, json={"benchmark": str(bench)}, headers=header, timeout=30)
                assert reply.status_code == 401, (route, header, reply.text)
            assert not server.jobs  # nothing was started
    server.close()


FORBIDDEN = {
    r"\b(import|from) (c?pickle|dill|cloudpickle|joblib|shelve)\b|\bpickle\.(loads?|Unpickler)\b|\bmarshal\.loads?\(":
        "pickle-like deserialisation",
    r"(?<![\w.])eval\(|(?<![\w.])exec\(": "eval/exec",
    r"yaml\.load\((?![^)]*SafeLoader)|yaml\.unsafe_load|yaml\.full_load": "unsafe YAML",
    r"torch\.load\((?![^)]*weights_only=True)": "torch.load without weights_only=True",
    r"allow_pickle=True": "numpy pickle",
    r"_object_list\(|broadcast_object|all_gather_object|send_object": "torch.distributed object (pickle) collectives",
}


def scan(text: str) -> list[tuple[int, str]]:
    return [(text[:m.start()].count("\n") + 1, what) for pattern, what in FORBIDDEN.items()
            for m in re.finditer(pattern, text)]


def test_the_scan_catches_what_it_looks_for():
    bad = ["import pickle", "from dill import loads", "x = pickle.loads(b)", "eval(s)", "exec(code)",
           "yaml.load(f)", "yaml.load(f, Loader=yaml.FullLoader)", "torch.load(path)",
           "torch.load(path, weights_only=False)", "np.load(f, allow_pickle=True)", "dist.broadcast_object_list(x)"]
    assert [len(scan(line)) for line in bad] == [1] * len(bad)
    fine = ["no pickle.", "model.eval()", "yaml.safe_load(f)", "torch.load(p, weights_only=True)", "safe_eval(x)"]
    assert [scan(line) for line in fine] == [[]] * len(fine)


def test_no_code_runs_on_deserialisation():
    """No source file deserialises with pickle, evaluates strings, or loads YAML or tensors unsafely.
    (DeepSpeed reads its own engine checkpoints with torch.load: docs/security.md says why that is
    acceptable: only checkpoints the learner wrote are loaded.)"""
    found = []
    for path in sorted(p for folder in ("mmupt", "services", "bench", "deploy") for p in (ROOT / folder).rglob("*.py")):
        found += [f"{path.relative_to(ROOT)}:{line}: {what}" for line, what in scan(path.read_text())]
    assert found == []
