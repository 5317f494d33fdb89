"""The learner with real components: DeepSpeed on the CPU, the tiny Qwen2.5-VL, a real Valkey server.

A reference run trains 4 steps uninterrupted; a killed-and-resumed run, a run resumed into an empty
Redis and a 2-rank ZeRO-3 run must reproduce its losses and weights.
"""
from __future__ import annotations

import io
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from learner_support import Feeder, alternating_rewards, learner_settings, make_learner, run_learner, wait_for
from safetensors.torch import load_file

from mmupt.config import ConfigError, load_settings
from mmupt.embedded_redis import free_port
from mmupt.services.learner.ledger import LedgerMismatch
from mmupt.services.learner.train_log import TrainLog
from mmupt.wire import PAYLOAD_FIELD

STEPS = 4  # the reference run: 4 steps of 2 groups, a checkpoint every 2


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(checkpoint) / "model.safetensors"))


def step_log(checkpoint_dir: Path) -> dict[int, dict]:
    return {row["step"]: row for row in TrainLog(Path(checkpoint_dir) / "train_log.jsonl").rows()}


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by up to {worst}"


def assert_accounted(counters: dict) -> None:
    assert counters["admitted"] == (counters["trained"] + counters["dropped_stale"] + counters["dropped_vote"]
                                    + counters["skipped_zero_advantage"] + counters["deadlettered"]
                                    + counters["in_flight"]), counters


@pytest.fixture(scope="module")
def reference(tiny_model_dir, shapes_dir, redis_url, tmp_path_factory):
    """The uninterrupted run every other run is compared with."""
    checkpoint_dir = tmp_path_factory.mktemp("reference") / "ckpt"
    settings = learner_settings(tiny_model_dir, shapes_dir, redis_url, f"ref-{uuid.uuid4().hex[:6]}", checkpoint_dir)
    learner = run_learner(settings)
    return SimpleNamespace(settings=settings, dir=checkpoint_dir, log=step_log(checkpoint_dir),
                           counters=learner.ledger.counters(), state=learner.streams.state(),
                           step2=checkpoint_dir / "step-000002", final=checkpoint_dir / "step-000004")


@pytest.fixture
def make_settings(tiny_model_dir, shapes_dir, redis_url, tmp_path):
    def make(**learner):
        run_id = f"test-{uuid.uuid4().hex[:8]}"
        return learner_settings(tiny_model_dir, shapes_dir, redis_url, run_id, tmp_path / run_id, **learner)
    return make


def test_uninterrupted_run_trains_every_group_once_and_keeps_the_last_checkpoints(reference):
    c = reference.counters
    assert c["admitted"] == c["trained"] == STEPS * 2 and c["in_flight"] == 0 and c["duplicates"] == 0
    assert reference.state["committed_step"] == str(STEPS) and reference.state["status"] == "finished"
    assert sorted(reference.log) == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in reference.log.values())
    assert reference.log[1]["grad_norm"] > 0 and reference.log[4]["kl"] > 0
    kept = sorted(p.name for p in reference.dir.iterdir() if p.name.startswith("step-"))
    assert kept == ["step-000002", "step-000004"]  # keep_checkpoints = 2
    assert (reference.dir / "latest").read_text() == "step-000004"
    assert (reference.dir / "train_curves.png").stat().st_size > 0


def test_checkpoint_folder_loads_with_plain_transformers_and_generates(reference, shapes_dir, tiny_model_dir):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmupt.data import load_jsonl

    model, info = AutoModelForImageTextToText.from_pretrained(reference.final, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    initial = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    trained, untouched = model.state_dict(), initial.state_dict()
    assert any(not torch.equal(trained[k], untouched[k]) for k in trained)  # the trained weights, not the initial
    processor = AutoProcessor.from_pretrained(reference.final)
    image = Image.open(io.BytesIO(load_jsonl(shapes_dir / "train.jsonl")[0].images[0])).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_killed_learner_resumes_exactly_and_trains_no_group_twice(reference, make_settings):
    settings = make_settings()
    with Feeder(settings) as feeder:
        feeder.allowed = 6  # data for 3 steps: the learner checkpoints at step 2, trains step 3, waits
        first = make_learner(settings)
        first.start()
        stop = threading.Event()
        thread = threading.Thread(target=first.run, args=(stop,), daemon=True)
        thread.start()
        wait_for(lambda: first.streams.state_int("step") == 3, what="step 3")
        stop.set()  # the process dies: nothing is written on the way out
        thread.join(timeout=60)
        ledger = first.ledger
        assert ledger.committed_step() == 2 and len(ledger.replay()) == 2 and ledger.counters()["trained"] == 4
        del first

        second = make_learner(settings)
        with pytest.raises(LedgerMismatch, match="--resume"):
            second.start(resume=False)
        second.start(resume=True)
        assert second.step == 2 and len(second.buffer) == 2  # step 3's groups, replayed first
        assert second.version == 4  # version 3 was published and lost: the checkpoint goes out as 4
        feeder.allowed = 10**9
        second.run(threading.Event())

    log = step_log(settings.learner.checkpoint_dir)
    assert sorted(log) == [1, 2, 3, 4]  # step 3 of the dead learner was forgotten and trained again
    for step in (3, 4):
        assert log[step]["loss"] == pytest.approx(reference.log[step]["loss"], abs=1e-6)
    assert_same_weights(weights(Path(settings.learner.checkpoint_dir) / "step-000004"), weights(reference.final))
    counters = second.ledger.counters()
    assert counters["trained"] == counters["admitted"] == 8 and counters["in_flight"] == 0
    assert counters["duplicates"] == 0 and second.ledger.replay() == []


def test_resume_into_an_empty_redis_rebuilds_the_ledger_from_the_checkpoint(reference, make_settings):
    settings = make_settings()  # a run id Redis has never seen: as after losing the server
    checkpoint_dir = Path(settings.learner.checkpoint_dir)
    checkpoint_dir.mkdir(parents=True)
    shutil.copytree(reference.step2, checkpoint_dir / "step-000002")
    shutil.copy(reference.dir / "train_log.jsonl", checkpoint_dir / "train_log.jsonl")
    learner = run_learner(settings, resume=True)
    log = step_log(checkpoint_dir)
    assert sorted(log) == [1, 2, 3, 4]
    for step in (3, 4):
        assert log[step]["loss"] == pytest.approx(reference.log[step]["loss"], abs=1e-6)
    assert_same_weights(weights(checkpoint_dir / "step-000004"), weights(reference.final))
    counters = learner.ledger.counters()
    assert counters["admitted"] == counters["trained"] == 8 and counters["in_flight"] == 0


def launch_two_ranks(settings, config: Path, *args: str) -> None:
    """`mmupt learner` under the deepspeed launcher: 2 ranks on gloo, fed by the feeder."""
    config.write_text(settings.dump_yaml())
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--no_local_rank", "--num_gpus", "2",
               "--master_port", str(free_port()), "--module", "mmupt", "learner", "--config", str(config), *args]
    with Feeder(settings):
        proc = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_ranks_with_zero3_take_the_same_steps_as_one_and_resume_exactly(reference, make_settings, tmp_path):
    settings = make_settings(zero_stage=3, max_steps=2, checkpoint_every=0)
    settings.learner.http_port = free_port()
    launch_two_ranks(settings, tmp_path / "two-ranks.yaml")
    checkpoint_dir = Path(settings.learner.checkpoint_dir)
    log = step_log(checkpoint_dir)
    for step in (1, 2):
        for stat in ("loss", "kl", "grad_norm", "tokens"):
            assert log[step][stat] == pytest.approx(reference.log[step][stat], rel=1e-4, abs=1e-6), (step, stat)
    assert_same_weights(weights(checkpoint_dir / "step-000002"), weights(reference.step2), atol=1e-5)
    assert len(list((checkpoint_dir / "step-000002" / "engine" / "engine").glob("*optim_states.pt"))) == 2

    settings.learner.max_steps = 4  # both ranks load their ZeRO-3 shards and go on
    launch_two_ranks(settings, tmp_path / "two-ranks.yaml", "--resume")
    log = step_log(checkpoint_dir)
    for step in (3, 4):
        assert log[step]["loss"] == pytest.approx(reference.log[step]["loss"], rel=1e-4, abs=1e-6), step
    assert_same_weights(weights(checkpoint_dir / "step-000004"), weights(reference.final), atol=1e-5)


def test_consumption_drops_stale_skips_flat_groups_and_recognises_duplicates(make_settings):
    def rewards(group):  # every other admitted prompt gets a unanimous (flat) group
        return [1.0] * len(group.responses) if int(group.group_id.split(":")[1]) % 2 else alternating_rewards(group)

    # The feeder's model never receives weights: after step 1 its groups are a version old, over max_staleness 0.
    settings = make_settings(max_staleness=0, skip_zero_advantage=True, checkpoint_every=0, max_steps=2)
    learner = make_learner(settings)
    learner.start()
    stop = threading.Event()
    with Feeder(settings, rewards=rewards):
        thread = threading.Thread(target=learner.run, args=(stop,), daemon=True)
        thread.start()
        wait_for(lambda: learner.streams.state_int("dropped_stale") >= 2, what="stale drops")
        held = learner.ledger.replay()[0]  # a group trained at step 1, awaiting its checkpoint
        learner.streams.r.xadd(learner.keys.scored, {PAYLOAD_FIELD: held})  # the voter delivers it again
        wait_for(lambda: learner.streams.state_int("duplicates") == 1, what="the duplicate")
        stop.set()
        thread.join(timeout=60)
    counters = learner.ledger.counters()
    assert learner.step == 1 and counters["skipped_zero_advantage"] >= 1 and counters["dropped_stale"] >= 2
    assert len(learner.ledger.held) == 2  # trained once; the duplicate was not buffered
    assert_accounted(counters)
    # Admission: untrained groups in flight never exceed (max_staleness + 1) rollout batches.
    assert counters["in_flight"] - len(learner.ledger.held) <= 2


def test_learner_settings_refuse_inconsistent_options():
    for options, field in (({"batch_groups": 4, "micro_groups": 3}, "micro_groups"),
                           ({"max_steps": 3, "updates_per_batch": 2}, "max_steps"),
                           ({"offload_optimizer": True}, "offload_optimizer"),
                           ({"zero_stage": 2, "offload_params": True}, "offload_params")):
        with pytest.raises(ConfigError, match=field):
            load_settings(environ={}, overrides={"learner": options})
