"""Checkpoint folders, written atomically, the newest N kept.

    checkpoint_dir/
      latest                  name of the newest complete checkpoint
      step-000004/            an HF-format model folder (config, safetensors, processor): transformers
        engine/               and vLLM load it as is; plus DeepSpeed's optimizer/engine state (one
        learner_state.json    shard per rank) and the learner's state (step, version, ledger)
      train_log.jsonl         one line per optimizer step (see train_log.py)

A checkpoint is written into a hidden `.step-N.partial` folder and renamed when complete, so a crash
while writing never leaves a half checkpoint where resume looks.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

STATE_FILE = "learner_state.json"
LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class Checkpoints:
    def __init__(self, root: str | Path, keep: int):
        self.root = Path(root)
        self.keep = keep

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:06d}"

    def begin(self, step: int) -> Path:
        """An empty folder to write the checkpoint of `step` into."""
        partial = self.root / f".step-{step:06d}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        return partial

    def finish(self, partial: Path, step: int, state: dict) -> Path:
        """Write the learner state, move the folder into place, point `latest` at it, prune old ones."""
        write_json(partial / STATE_FILE, state)
        final = self.path(step)
        if final.exists():  # e.g. the final checkpoint of a run resumed at its last step
            shutil.rmtree(final)
        os.replace(partial, final)
        write_text(self.root / LATEST_FILE, final.name)
        self.prune()
        return final.resolve()

    def latest(self) -> Path | None:
        pointer = self.root / LATEST_FILE
        if pointer.is_file():
            path = self.root / pointer.read_text().strip()
            if (path / STATE_FILE).is_file():
                return path
        complete = [p for p in self._step_dirs() if (p / STATE_FILE).is_file()]
        return complete[-1] if complete else None

    def prune(self) -> None:
        for old in self._step_dirs()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def _step_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted(dirs, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2))
