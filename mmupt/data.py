"""Training and evaluation data in the MM-UPT format.

One item per line (JSONL): `problem` (text with one `<image>` placeholder per image), `images` (a list
of paths relative to the file, or a single path), `answer` (optional; never read for training
rewards), optional `id` and `options`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .config import DataSettings


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Item:
    id: str
    problem: str
    images: list[bytes]
    answer: str | None = None
    options: list[str] = field(default_factory=list)


def _as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def load_jsonl(path: str | Path) -> list[Item]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    items = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON: {exc}") from None
            if not isinstance(row, dict) or "problem" not in row:
                raise DataError(f"{path}:{lineno}: each line needs a 'problem' field")
            images = []
            for ref in _as_list(row.get("images", row.get("image"))):
                image_path = (path.parent / ref) if not Path(ref).is_absolute() else Path(ref)
                try:
                    images.append(image_path.read_bytes())
                except OSError as exc:
                    raise DataError(f"{path}:{lineno}: cannot read image {ref}: {exc.strerror}") from None
            answer = row.get("answer")
            items.append(Item(id=str(row.get("id", f"{path.stem}-{lineno}")), problem=str(row["problem"]),
                              images=images, answer=None if answer is None else str(answer),
                              options=[str(o) for o in _as_list(row.get("options"))]))
    if not items:
        raise DataError(f"{path}: no items")
    return items


def ensure_data(settings: DataSettings) -> None:
    """Generate the synthetic shapes task at the configured paths when allowed and missing."""
    paths = [Path(settings.train)] + ([Path(settings.eval)] if settings.eval else [])
    if all(p.is_file() for p in paths):
        return
    if not settings.synthetic_if_missing:
        missing = ", ".join(str(p) for p in paths if not p.is_file())
        raise DataError(f"data file(s) missing: {missing} (set data.synthetic_if_missing to generate the demo task)")
    from . import shapes_task

    out_dir = Path(settings.train).parent
    train, test = shapes_task.write_dataset(out_dir, settings.synthetic_train_size, settings.synthetic_eval_size,
                                            settings.synthetic_seed)
    if train != Path(settings.train) or (settings.eval and test != Path(settings.eval)):
        raise DataError(f"synthetic data is written as {train} and {test}; point data.train/data.eval there")
