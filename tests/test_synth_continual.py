"""Continual mode: synthetic prompts generated on the fly through a real rollout server's API and
mixed into the learner's admissions at the configured ratio (real Redis, the real tiny model); and
`mmupt run` on synthesised questions alone, and in synthetic-only continual mode."""
from __future__ import annotations

import threading

import pytest

from mmupt.config import load_settings
from mmupt.data import load_items
from mmupt.run import run
from mmupt.services.rollout.api import RolloutServer, build_app
from mmupt.services.rollout.hf_backend import TransformersBackend
from mmupt.services.voter.grading import make_grader
from mmupt.streams import Streams, connect
from mmupt.synth.command import run_synthesis
from mmupt.synth.continual import ContinualSynthesis, live_rollout_urls
from mmupt.wire import PromptMsg, decode
from learner_support import make_learner
from rollout_support import TOKEN, serving

# The tiny model writes nonsense: without the marker rule and the majority threshold its questions
# get through (the filters themselves are tested in test_synth*.py).
LENIENT = {"require_marker": False, "min_words": 1, "min_majority_share": 0.0, "questions_per_seed": 2,
           "max_tokens": 8, "answer_samples": 2, "seeds_per_batch": 2}


@pytest.fixture(scope="module")
def server_address(tiny_model_dir):
    settings = load_settings(environ={}, overrides={"model": {"path": str(tiny_model_dir), "device": "cpu"},
                                                    "voter": {"grader": "exact"}, "auth": {"token": TOKEN}})
    server = RolloutServer(settings, TOKEN)
    server.attach(TransformersBackend(settings.model))
    with serving(build_app(server)) as url:
        yield url.removeprefix("http://")
    server.close()


@pytest.fixture
def continual(settings, redis_url, server_address):
    """Settings in continual mode, the run's streams with the rollout server registered, and seeds."""
    settings = settings.model_copy(deep=True)
    settings.synth = settings.synth.model_copy(update={**LENIENT, "ratio": 0.5, "ready_prompts": 4})
    streams = Streams(connect(redis_url), settings.run_id, settings.streams)
    streams.ensure_groups()
    streams.register_server("127.0.0.1:1", {"grpc": "127.0.0.1:1", "http": server_address, "version": 0})
    items = load_items(settings.data.train)[:6]
    return settings, streams, items


def make_synthesis(settings, streams, items) -> ContinualSynthesis:
    return ContinualSynthesis(settings, items, live_rollout_urls(streams, settings.rollout.heartbeat_s),
                              make_grader("exact"))


def test_synthesis_queues_filtered_prompts_without_answers_from_the_live_server(continual):
    settings, streams, items = continual
    synthesis = make_synthesis(settings, streams, items)
    try:
        queued = synthesis.step(threading.Event())
        report = synthesis.report.as_dict()
        assert report["accounted"] and report["seeds"] == 2 and report["generated"] == 4
        assert queued == report["kept"] > 0
        seed_images = {image for item in items for image in item.images}
        for _ in range(queued):
            item = synthesis.take()
            assert item.answer is None and item.id.startswith("synth-")
            assert item.problem.startswith("<image>") and item.images[0] in seed_images
        assert synthesis.take() is None
    finally:
        synthesis.close()


def test_without_a_live_server_synthesis_waits(continual):
    settings, streams, items = continual
    streams.unregister_server("127.0.0.1:1")
    synthesis = make_synthesis(settings, streams, items)
    try:
        assert synthesis.step(threading.Event()) == 0 and synthesis.report.generated == 0
    finally:
        synthesis.close()


def admitted_prompts(streams) -> list[PromptMsg]:
    return [decode(fields[b"m"], PromptMsg) for _, fields in streams.r.xrange(streams.keys.prompts)]


def test_the_learner_mixes_synthetic_prompts_in_at_the_ratio(continual):
    settings, streams, items = continual
    synthesis = make_synthesis(settings, streams, items)
    try:
        while synthesis.ready.qsize() < 2:
            synthesis.step(threading.Event())
        learner = make_learner(settings, synthesis)
        learner.start()
        assert learner.admit(threading.Event()) == 4  # (max_staleness + 1) x batch, capped by max_steps x batch
        prompts = admitted_prompts(streams)
        # ratio 0.5: synthetic <= 0.5 x admitted, a synthetic prompt whenever one is due.
        assert [p.group_id.split(":")[0] for p in prompts] == ["synth", "0", "synth", "0"]
        for prompt in prompts:
            synthetic = prompt.group_id.startswith("synth:")
            assert (prompt.hidden_answer is None) == synthetic and prompt.prompt_id.startswith("synth-") == synthetic
        state = streams.state()
        assert (state["admitted"], state["synthetic"], state["cursor"]) == ("4", "2", "2")
        assert len({p.group_id for p in prompts}) == 4
    finally:
        synthesis.close()


def test_none_ready_admits_dataset_items_and_synthetic_only_waits(continual):
    settings, streams, items = continual
    synthesis = make_synthesis(settings, streams, items)  # never stepped: nothing ready
    try:
        learner = make_learner(settings, synthesis)
        learner.start()
        assert learner.admit(threading.Event()) == 4
        assert all(not p.group_id.startswith("synth:") for p in admitted_prompts(streams))
        synthesis.cfg.ratio = 1.0
        streams.r.delete(streams.keys.inflight)
        learner.ledger.init()  # a fresh account: nothing in flight
        assert learner.admit(threading.Event()) == 0
    finally:
        synthesis.close()


@pytest.mark.slow
def test_mmupt_run_trains_on_synthesised_questions_alone(settings, tmp_path):
    synth = settings.model_copy(deep=True)
    synth.synth = synth.synth.model_copy(update={**LENIENT, "questions_per_seed": 4})
    data = tmp_path / "synthetic.jsonl"
    report = run_synthesis(synth, settings.data.train, data, mode="direct", limit=4, show_bar=False)
    assert report["kept"] >= settings.learner.batch_groups
    settings.data.train = str(data)  # the only change
    settings.learner.max_steps = 1
    summary = run(settings, tmp_path / "run", run_id=settings.run_id)
    assert summary["status"] == "finished" and summary["steps"] == 1
    assert summary["groups_trained"] == settings.learner.batch_groups and summary["prompts_synthetic"] == 0


@pytest.mark.slow
def test_mmupt_run_in_synthetic_only_continual_mode(settings, tmp_path):
    settings.synth = settings.synth.model_copy(update={**LENIENT, "ratio": 1.0})
    settings.learner.max_steps = 1
    summary = run(settings, tmp_path / "run", run_id=settings.run_id)
    assert summary["status"] == "finished" and summary["steps"] == 1
    assert summary["prompts_synthetic"] == summary["prompts_admitted"] >= summary["groups_trained"] > 0
    assert summary["groups_in_flight"] == summary["prompts_admitted"] - summary["groups_trained"] \
        - summary["groups_dropped_stale"] - summary["groups_dropped_vote"] - summary["groups_deadlettered"]
