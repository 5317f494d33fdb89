"""Fault injection at CI scale: kill or stop each service, restart Redis from its AOF, cut every
connection, all during one real run of the tiny model; nothing may be lost or trained twice.

The report (faults_report.json in the test's tmp folder) holds one account per fault kind; the
larger version is bench/faults.py.
"""
from __future__ import annotations

import json

import pytest

from mmupt.faults import FAULTS, run_faults

pytestmark = pytest.mark.slow


def fault_settings(settings):
    s = settings.model_copy(deep=True)
    s.shutdown_grace_s = 10.0
    s.streams.claim_idle_ms = 3000        # reclaim a dead consumer's entries after 3 s, not 60
    s.learner.checkpoint_every = 1        # every step is committed: the restarted learner resumes from it
    s.learner.keep_checkpoints = 1000     # keep every commit record, to prove no group is trained twice
    s.learner.max_steps = 100_000        # run_faults ends the run itself once the faults are done
    s.learner.push_timeout_s = 20.0
    return s


def assert_nothing_lost(account: dict, where: str) -> None:
    assert account["balanced"], f"{where}: admitted != finished + in flight: {account}"
    assert account["lost"] == [], f"{where}: prompts in flight found nowhere in Redis: {account['lost']}"
    for dead in account["deadletter"]:
        assert dead["reason"] and dead["stream"] and dead["service"], f"{where}: unexplained dead letter {dead}"


def test_every_fault_kind_loses_nothing_and_trains_nothing_twice(settings, tmp_path):
    faults = list(FAULTS)
    report = run_faults(fault_settings(settings), tmp_path / "run", faults, steps_between=2)
    print(json.dumps(report, indent=1))
    assert [f["fault"] for f in report["faults"]] == faults
    for fault in report["faults"]:
        assert_nothing_lost(fault, fault["fault"])
        assert fault["trained_twice"] == [], fault
        if fault["fault"].startswith("term_"):
            assert fault["exit_code"] == 0 and fault["exit_seconds"] <= 13, fault
    logs = "".join(path.read_text(errors="replace") for path in (tmp_path / "run" / "logs").glob("*.log"))
    assert settings.auth.token and settings.auth.token not in logs  # the token is never logged
    final = report["final"]
    assert_nothing_lost(final, "end of run")
    assert final["in_flight"] == 0 and final["trained_twice"] == []
    assert final["committed"] == final["trained"] > 0
    assert final["admitted"] == (final["trained"] + final["dropped_stale"] + final["dropped_vote"]
                                 + final["skipped_zero_advantage"] + final["deadlettered"])
