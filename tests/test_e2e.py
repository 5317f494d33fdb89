"""The whole system: three services as separate processes against a real server."""
import json
import threading
import time

import pytest

from mmupt.run import run
from mmupt.streams import Streams, connect
from mmupt.wire import PAYLOAD_FIELD

pytestmark = pytest.mark.slow


def test_run_trains_pushes_and_accounts_for_every_prompt(settings, tmp_path):
    settings.learner.max_steps = 3
    settings.redis_url = None  # the embedded default server, as `mmupt run` uses it
    out = tmp_path / "run"
    summary = run(settings, out, run_id=settings.run_id)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["steps"] == 3 and summary["policy_version"] == 3
    assert summary["rollout_policy_version"] == 3
    assert summary["rollout_weights_checksum"] != summary["initial_weights_checksum"]
    # Every admitted prompt is trained or counted; nothing is left pending in any stream.
    assert summary["prompts_admitted"] == (summary["groups_trained"] + summary["groups_dropped_stale"]
                                           + summary["groups_dropped_vote"] + summary["groups_skipped_zero_advantage"]
                                           + summary["groups_deadlettered"]
                                           + summary["groups_in_flight"])
    assert summary["groups_trained"] == 3 * settings.learner.batch_groups
    assert summary["groups_in_flight"] == 0
    for when in ("eval_before", "eval_after"):   # held-out accuracy, with the fixture's evaluation k=2 on 4 questions
        result = summary[when]
        assert result["k"] == 2 and result["n"] == 4, when
        assert all(0.0 <= result[m] <= 1.0 for m in ("accuracy", "greedy_accuracy", "maj_accuracy")), when
    for name in ("prompts", "groups", "scored"):
        assert summary["streams"][name] == {"length": 0, "pending": 0}, name
    assert (out / "logs" / "learner.log").is_file()
    from transformers import AutoModelForImageTextToText

    assert AutoModelForImageTextToText.from_pretrained(summary["checkpoint"]) is not None


def test_malformed_entry_goes_to_dead_letter_and_the_run_goes_on(settings, tmp_path):
    settings.learner.max_steps = 2
    client = connect(settings.redis_url)
    streams = Streams(client, settings.run_id, settings.streams)

    def inject():  # once the run has created its streams, slip in garbage for the voter and learner
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not client.exists(streams.keys.groups):
            time.sleep(0.1)
        client.xadd(streams.keys.groups, {PAYLOAD_FIELD: b"\x93not-a-group"})
        client.xadd(streams.keys.scored, {b"wrong-field": b"x"})

    thread = threading.Thread(target=inject, daemon=True)
    thread.start()
    summary = run(settings, tmp_path / "run", run_id=settings.run_id)
    thread.join()
    assert summary["status"] == "finished" and summary["policy_version"] == 2
    dead = client.xrange(streams.keys.deadletter)
    reasons = sorted((fields[b"stream"], fields[b"service"]) for _, fields in dead)
    assert reasons == [(b"groups", b"voter"), (b"scored", b"learner")]
    assert all(fields[b"reason"] for _, fields in dead)
    assert summary["streams"]["groups"]["pending"] == 0 and summary["streams"]["scored"]["pending"] == 0
