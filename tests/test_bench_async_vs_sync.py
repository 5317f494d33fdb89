"""bench/async_vs_sync.py end to end at tiny size: both modes run, and the record holds real figures,
including the balance as it was in the runs (the learner's step and its wait per batch)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_both_modes_run_and_sync_waits_for_each_batch(tiny_model_dir, shapes_dir, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "run_id": "bench-smoke", "redis_url": None,
        "model": {"path": str(tiny_model_dir), "device": "cpu"},
        "data": {"train": str(shapes_dir / "train.jsonl"), "eval": str(shapes_dir / "test.jsonl")},
        "learner": {"checkpoint_dir": str(tmp_path / "ckpt")},
    }))
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "async_vs_sync.py"), "--config", str(config), "--steps", "3",
         "--rounds", "1", "--group-size", "4", "--max-new-tokens", "8", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "calibration: rollout batch" in done.stdout
    record = json.loads((out / "async_vs_sync.json").read_text())
    modes = {r["mode"]: r for r in record["results"]}
    assert set(modes) == {"async", "sync"}
    assert all(r["steps_per_min"] > 0 and r["learner_step_s"] > 0 for r in modes.values())
    assert modes["sync"]["learner_wait_s"] > 0  # each batch is sampled only after the previous push
    assert modes["sync"]["mean_version_lag"] == 0
    assert record["async_over_sync"] == pytest.approx(modes["async"]["steps_per_min"] / modes["sync"]["steps_per_min"])
    assert record["calibration"]["rollout_batch_s"] > 0 and record["calibration"]["learner_step_s"] > 0
    assert (out / "async_vs_sync.png").stat().st_size > 0
