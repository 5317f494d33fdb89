"""Shared fixtures: a real Redis-compatible server, the tiny model, the synthetic task.

No fakes: the server is a real Valkey process (the embedded default) unless MMUPT_TEST_REDIS_URL
points at another real server (e.g. the machine's Redis 7).
"""
from __future__ import annotations

import os
import uuid

import pytest

from mmupt.config import Settings, load_settings
from mmupt.embedded_redis import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_url():
    url = os.environ.get("MMUPT_TEST_REDIS_URL")
    if url:
        yield url
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def run_id():
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def redis_client(redis_url):
    from mmupt.streams import connect

    client = connect(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from mmupt.model import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    from mmupt.shapes_task import write_dataset

    out = tmp_path_factory.mktemp("shapes")
    write_dataset(out, train_size=64, eval_size=16, seed=0)
    return out


@pytest.fixture
def settings(tiny_model_dir, shapes_dir, redis_url, run_id, tmp_path) -> Settings:
    """Settings for the tiny model and data, isolated from the caller's MMUPT_* environment."""
    return load_settings(environ={}, overrides={
        "run_id": run_id, "redis_url": redis_url,
        "model": {"path": str(tiny_model_dir), "device": "cpu"},
        "data": {"train": str(shapes_dir / "train.jsonl"), "eval": str(shapes_dir / "test.jsonl")},
        "rollout": {"group_size": 4, "max_new_tokens": 8},
        "learner": {"batch_groups": 2, "micro_groups": 1, "max_steps": 2, "lr": 1e-3,
                    "checkpoint_dir": str(tmp_path / "ckpt")},
        "auth": {"token": "test-token"},
        "evaluation": {"k": 2, "limit": 4},
    })
