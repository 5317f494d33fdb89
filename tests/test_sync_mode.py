"""Synchronous mode (`learner.async: false`) against the asynchronous default.

In sync mode the learner admits one rollout batch at a time, only after the previous one is trained and
its weights pushed, and the rollout server samples only at the newest version: every trained group has
staleness 0. The async default admits (max_staleness + 1) batches up front, so generation runs ahead.
"""
import threading
import uuid

import pytest
from learner_support import learner_settings, make_learner

from mmupt.run import run
from mmupt.services.learner.train_log import TrainLog
from mmupt.streams import Streams, connect


@pytest.mark.parametrize("asynchronous, admitted", [(True, 3), (False, 1)], ids=["async", "sync"])
def test_admission_holds_max_staleness_plus_one_batches_in_async_mode_and_one_in_sync_mode(
        tiny_model_dir, shapes_dir, redis_url, tmp_path, asynchronous, admitted):
    settings = learner_settings(tiny_model_dir, shapes_dir, redis_url, f"test-{uuid.uuid4().hex[:8]}", tmp_path,
                                max_staleness=2, max_steps=4, batch_groups=2, **{"async": asynchronous})
    learner = make_learner(settings)
    learner.start()
    assert learner.admit(threading.Event()) == admitted * 2
    assert learner.admit(threading.Event()) == 0  # nothing more until a batch is trained


def untrained_in_flight_peak(settings, done: threading.Event, peak: list[int]) -> None:
    """Poll the ledger: admitted groups not yet trained (trained ones wait in the replay list until the
    checkpoint commits them, and stay in the in-flight hash until then)."""
    keys = Streams(connect(settings.redis_url), settings.run_id, settings.streams).keys
    client = connect(settings.redis_url)
    while not done.wait(0.01):
        pipe = client.pipeline(transaction=True)
        pipe.hlen(keys.inflight)
        pipe.llen(keys.replay)
        inflight, trained = pipe.execute()
        peak[0] = max(peak[0], inflight - trained)


@pytest.mark.slow
def test_sync_run_trains_only_groups_sampled_at_the_current_version(settings, tmp_path):
    settings.learner.max_steps = 3
    settings.learner.max_staleness = 2  # ignored in sync mode
    settings.learner.async_ = False
    batch = settings.learner.batch_groups
    done, peak = threading.Event(), [0]
    monitor = threading.Thread(target=untrained_in_flight_peak, args=(settings, done, peak), daemon=True)
    monitor.start()
    try:
        summary = run(settings, tmp_path / "run", run_id=settings.run_id)
    finally:
        done.set()
        monitor.join()
    assert summary["status"] == "finished" and summary["steps"] == 3 and summary["policy_version"] == 3
    assert summary["rollout_policy_version"] == 3
    assert peak[0] <= batch  # one batch at a time: no generation overlaps training
    rows = TrainLog(tmp_path / "run" / "checkpoints" / "train_log.jsonl").rows()
    assert [row["version_lag_max"] for row in rows] == [0, 0, 0]  # every group was sampled at exactly the current policy
    # After each push the learner sits idle while the next batch is sampled and voted on.
    assert all(row["wait_seconds"] > 0 for row in rows[1:])
    assert summary["groups_dropped_stale"] == 0
    assert summary["groups_trained"] == summary["prompts_admitted"] == 3 * batch
