"""Synchronous mode (`learner.async: false`) against the asynchronous default, with the three real services.

In sync mode the learner admits one rollout batch at a time, only after the previous one is trained and
its weights pushed, and the rollout server samples only at the newest version: every trained group has
staleness 0. The async run is the control: it admits (max_staleness + 1) batches up front, so the same
observations differ there (the test can tell the modes apart).
"""
import threading

import pytest

from mmupt.run import run
from mmupt.services.learner.train_log import TrainLog
from mmupt.streams import Streams, connect

pytestmark = pytest.mark.slow


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


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_sync_mode_trains_only_groups_sampled_at_the_current_version(settings, tmp_path, asynchronous):
    settings.learner.max_steps = 3
    settings.learner.max_staleness = 2
    settings.learner.async_ = asynchronous
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
    lags = [row["version_lag_max"] for row in TrainLog(tmp_path / "run" / "checkpoints" / "train_log.jsonl").rows()]
    assert len(lags) == 3
    if asynchronous:
        # Three batches admitted at version 0 before the first step: generation runs ahead of training.
        assert peak[0] == 3 * batch
    else:
        assert peak[0] <= batch  # one batch at a time: no generation overlaps training
        assert lags == [0, 0, 0]  # every trained group was sampled at exactly the current policy
        assert summary["groups_dropped_stale"] == 0
        assert summary["groups_trained"] == summary["prompts_admitted"] == 3 * batch
