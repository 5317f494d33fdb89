"""Every service's HTTP API fuzzed from its own OpenAPI schema (schemathesis): whatever a client sends,
the answer is never a 5xx and the app never raises. Real apps: the tiny model behind the rollout API,
the MathRuler grader (sympy workers) behind the voter, a real learner (engine, Redis ledger)."""
from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable

from mmupt.config import load_settings
from mmupt.services.rollout.api import RolloutServer, build_app
from mmupt.services.rollout.hf_backend import TransformersBackend
from mmupt.services.voter.grading import make_grader
from mmupt.services.voter.main import vote_app
from learner_support import learner_settings, make_learner
from rollout_support import TOKEN

EXAMPLES = hypothesis_settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck),
                               derandomize=True)


@pytest.fixture(scope="module")
def rollout_schema(tiny_model_dir, tmp_path_factory):
    s = load_settings(environ={}, overrides={
        "model": {"path": str(tiny_model_dir), "device": "cpu"},
        "rollout": {"max_new_tokens": 4, "max_request_n": 2, "max_request_new_tokens": 4, "max_prompt_tokens": 160,
                    "max_request_bytes": 200_000, "max_queue": 4, "retry_after_s": 1,
                    "allowed_local_dirs": [str(tmp_path_factory.mktemp("allowed"))]},
        "streams": {"max_image_bytes": 100_000, "max_image_pixels": 250_000},
        "voter": {"grader": "mathruler"},
        "auth": {"token": TOKEN},
    })
    server = RolloutServer(s, TOKEN)
    server.attach(TransformersBackend(s.model))
    yield schemathesis.openapi.from_asgi("/openapi.json", build_app(server))
    server.close()


@pytest.fixture(scope="module")
def voter_schema():
    s = load_settings(environ={}, overrides={"voter": {"max_request_bytes": 100_000}})
    grader = make_grader("mathruler", 1.0)
    grader.start(wait=True)
    yield schemathesis.openapi.from_asgi("/openapi.json", vote_app(s, grader))
    grader.close()


@pytest.fixture
def learner_schema(tiny_model_dir, shapes_dir, redis_url, run_id, tmp_path):
    from mmupt.services.learner.main import learner_app

    learner = make_learner(learner_settings(tiny_model_dir, shapes_dir, redis_url, run_id, tmp_path / "ckpt"))
    learner.start()
    return schemathesis.openapi.from_asgi("/openapi.json", learner_app(learner))


def no_server_error(case, headers: dict | None) -> int:
    response = case.call(headers=headers)
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:500]}"
    return response.status_code


def fuzz(schema, headers: dict | None = None) -> dict[str, Counter]:
    """Run EXAMPLES generated cases, valid by the schema and not, against every operation (the
    schemathesis pytest plugin does not run under this pytest, so hypothesis drives each strategy here)."""
    fuzzed: dict[str, Counter] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path.startswith("/metrics"):
            continue

        statuses = fuzzed[f"{operation.method.upper()} {operation.path}"] = Counter()
        for mode in schemathesis.GenerationMode:
            @EXAMPLES
            @given(case=operation.as_strategy(mode))
            def check(case):
                statuses[no_server_error(case, headers)] += 1

            try:
                check()
            except Unsatisfiable:  # nothing in this operation can be made invalid (e.g. GET /healthz)
                assert mode is schemathesis.GenerationMode.NEGATIVE
    print({name: dict(counts) for name, counts in fuzzed.items()})
    return fuzzed


def test_rollout_api_never_answers_5xx(rollout_schema):
    # With the token: the fuzzer reaches past the eval endpoint's auth check (tests/test_security.py has the refusals).
    statuses = fuzz(rollout_schema, {"Authorization": f"Bearer {TOKEN}"})
    assert statuses["POST /v1/chat/completions"][200] > 0 and statuses["POST /v1/chat/completions"][400] > 0


def test_voter_api_never_answers_5xx(voter_schema):
    statuses = fuzz(voter_schema)["POST /v1/vote"]
    assert statuses[200] > 0 and statuses[422] > 0


def test_learner_api_never_answers_5xx(learner_schema):
    assert "GET /v1/status" in fuzz(learner_schema)
