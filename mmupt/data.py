"""Training and evaluation data in the MM-UPT format, from parquet, JSONL or JSON files.

Each row has a `problem` (text with one `<image>` placeholder per image), `images` and, optionally,
`answer` (never read for training rewards), `id` and `options`. The column names are configurable
(`data.*_column`). An `images` cell may be one image or a list of them, each given as:

- raw bytes (parquet),
- a path, relative to `data.image_root` (default: the data file's folder) or absolute,
- a Hugging Face `datasets` image `{"bytes": ..., "path": ...}` (bytes win when both are set),
- a `data:image/...;base64,` URL (JSONL cannot hold raw bytes).

The number of `<image>` placeholders must equal the number of images; a problem without any shows
its images before the text (the rule of `mmupt.model.build_messages`, which builds the prompts).
Other tags, such as MATH-Vision's `<image1>`, are plain text. Every image is decoded once at load
time, so a broken file fails here, naming the file, the row and the reason, not hours into a run.
"""
from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .config import DataSettings, PromptSettings, StreamSettings
from .images import ImageError, decode_image
from .model import PromptError, build_messages

log = logging.getLogger(__name__)
SUFFIXES = (".parquet", ".jsonl", ".json")
PROGRESS_EVERY_S = 5.0


class DataError(ValueError):
    """A data file that cannot be used; the message names the file, the row and the reason."""


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
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ---- reading rows -------------------------------------------------------------------------------
def _required(cfg: DataSettings) -> dict[str, str]:
    """Required column -> the setting that names it (for error messages)."""
    return {cfg.problem_column: "data.problem_column", cfg.images_column: "data.images_column"}


def _parquet_rows(path: Path, required: dict[str, str]) -> Iterator[tuple[str, dict, float]]:
    """(row label, row, fraction of the file read) for every row of a parquet file."""
    import pyarrow.parquet as pq

    try:
        pfile = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: not a readable parquet file: {exc}") from None
    names = pfile.schema_arrow.names
    for column, setting in required.items():
        if column not in names:
            raise DataError(f"{path}: no column {column!r} (columns: {', '.join(names)}); "
                            f"set {setting} to the right name")
    total = max(1, pfile.metadata.num_rows)
    index = 0
    for batch in pfile.iter_batches(batch_size=256):
        for row in batch.to_pylist():
            index += 1
            yield f"row {index}", row, index / total


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict, float]]:
    total = max(1, path.stat().st_size)
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON: {exc}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object")
            yield f"line {lineno}", row, f.tell() / total


def _json_rows(path: Path) -> Iterator[tuple[str, dict, float]]:
    try:
        rows = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: a .json data file must hold a list of objects")
    for index, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: item {index} is not a JSON object")
        yield f"item {index}", row, index / len(rows)


# ---- images -------------------------------------------------------------------------------------
class _ImageReader:
    """Turns one `images` reference into checked bytes."""

    def __init__(self, root: Path, limits: StreamSettings):
        self.root = root
        self.limits = limits

    def read(self, ref) -> bytes:
        if isinstance(ref, dict):  # Hugging Face datasets' Image feature
            if ref.get("bytes"):
                ref = ref["bytes"]
            elif ref.get("path"):
                ref = ref["path"]
            else:
                raise ImageError("image entry has neither 'bytes' nor 'path'")
        if isinstance(ref, (bytes, bytearray, memoryview)):
            data = bytes(ref)
        elif isinstance(ref, str) and ref.startswith("data:"):
            data = self._data_url(ref)
        elif isinstance(ref, str):
            image_path = Path(ref) if Path(ref).is_absolute() else self.root / ref
            try:
                data = image_path.read_bytes()
            except OSError as exc:
                raise ImageError(f"cannot read image file {image_path}: {exc.strerror}") from None
        else:
            raise ImageError(f"an image must be bytes, a path or {{'bytes', 'path'}}, got {type(ref).__name__}")
        decode_image(data, self.limits.max_image_bytes, self.limits.max_image_pixels)  # raises ImageError
        return data

    @staticmethod
    def _data_url(url: str) -> bytes:
        header, _, payload = url.partition(",")
        if not header.endswith(";base64") or not payload:
            raise ImageError("a data URL image must be base64 encoded (data:image/...;base64,...)")
        try:
            return base64.b64decode(payload, validate=True)
        except ValueError:
            raise ImageError("data URL holds invalid base64") from None


# ---- items --------------------------------------------------------------------------------------
def _text(value) -> str | None:
    return None if value is None else str(value)


def _answer(value) -> str | None:
    """An empty answer is no answer: synthetic questions (the paper's data sets, `mmupt synth`) leave
    it empty, and monitoring must not score the majority against ""."""
    text = _text(value)
    return text if text is not None and text.strip() else None


def _item(row: dict, label: str, path: Path, cfg: DataSettings, reader: _ImageReader) -> Item:
    where = f"{path}: {label}"
    for column, setting in _required(cfg).items():
        if column not in row:
            raise DataError(f"{where}: no {column!r} field (fields: {', '.join(row) or 'none'}); "
                            f"set {setting} to the right name")
    problem = row[cfg.problem_column]
    if not isinstance(problem, str) or not problem.strip():
        raise DataError(f"{where}: {cfg.problem_column!r} must be non-empty text")
    images = []
    for number, ref in enumerate(_as_list(row[cfg.images_column]), 1):
        try:
            images.append(reader.read(ref))
        except ImageError as exc:
            raise DataError(f"{where}: image {number} is unusable: {exc}") from None
    try:
        build_messages(problem, len(images), PromptSettings())  # the same rule the prompt builder applies
    except PromptError as exc:
        raise DataError(f"{where}: {exc}") from None
    item_id = row.get(cfg.id_column)
    return Item(id=str(item_id) if item_id is not None else f"{path.stem}-{label.split()[-1]}",
                problem=problem, images=images, answer=_answer(row.get(cfg.answer_column)),
                options=[str(o) for o in _as_list(row.get(cfg.options_column))])


def load_items(path: str | Path, cfg: DataSettings | None = None,
               limits: StreamSettings | None = None) -> list[Item]:
    """Every item of a parquet, JSONL or JSON file, images read and checked."""
    cfg = cfg or DataSettings()
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows = _parquet_rows(path, _required(cfg))
    elif suffix == ".jsonl":
        rows = _jsonl_rows(path)
    elif suffix == ".json":
        rows = _json_rows(path)
    else:
        raise DataError(f"{path}: unknown data format {suffix!r} (use {', '.join(SUFFIXES)})")
    reader = _ImageReader(Path(cfg.image_root) if cfg.image_root else path.parent, limits or StreamSettings())
    items, started, last_log = [], time.monotonic(), time.monotonic()
    for label, row, done in rows:
        items.append(_item(row, label, path, cfg, reader))
        if time.monotonic() - last_log >= PROGRESS_EVERY_S:
            last_log = time.monotonic()
            elapsed = last_log - started
            log.info("loading %s: %d items (%.0f/s), %.0f%% done, ETA %.0fs", path.name, len(items),
                     len(items) / elapsed, 100 * done, elapsed * (1 - done) / max(done, 1e-9))
    if not items:
        raise DataError(f"{path}: no items")
    _report(path, items)
    return items


def _report(path: Path, items: list[Item]) -> None:
    labelled = sum(item.answer is not None for item in items)
    images = sum(len(item.images) for item in items)
    log.info("loaded %s: %d items, %d images, %d with an answer (monitoring only)", path, len(items),
             images, labelled)


def load_jsonl(path: str | Path) -> list[Item]:
    """The default columns of any supported file (kept for callers written before parquet support)."""
    return load_items(path)


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
                                            settings.synthetic_seed, settings.synthetic_questions)
    if train != Path(settings.train) or (settings.eval and test != Path(settings.eval)):
        raise DataError(f"synthetic data is written as {train} and {test}; point data.train/data.eval there")
