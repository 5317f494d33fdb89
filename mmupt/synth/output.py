"""Writing synthesised questions in the training format, and every dropped one with its reason.

Kept questions become rows that `mmupt run` trains on as they are (`data.train`): `id`, `problem`
(one `<image>` per image, then the question), `images`, an empty `answer` (as in the paper's
synthetic data sets), and provenance: `seed_id`, `mode`, `model_version`, `majority_share` (of G
answers with the image) and `blind_share` (without it). JSONL files get their images as files in a
folder beside them (`<name>-images/`, named by content hash, paths relative to the file); parquet
files embed the image bytes.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

from PIL import Image

from .pipeline import Candidate, problem_for

SUFFIXES = (".jsonl", ".parquet")


def output_paths(out: Path) -> dict[str, Path]:
    """The data file and its companions: rejected questions, the report and its plot."""
    stem = out.with_suffix("")
    return {"data": out, "rejected": Path(f"{stem}.rejected.jsonl"), "report": Path(f"{stem}.report.json"),
            "plot": Path(f"{stem}.report.png"), "images": Path(f"{stem}-images")}


def _extension(data: bytes) -> str:
    try:
        kind = (Image.open(io.BytesIO(data)).format or "png").lower()
    except Exception:  # load_items decoded every seed image already; this is only a file name
        kind = "bin"
    return {"jpeg": "jpg"}.get(kind, kind)


def check_output(out: str | Path) -> Path:
    out = Path(out)
    if out.suffix.lower() not in SUFFIXES:
        raise ValueError(f"the output file must end with {' or '.join(SUFFIXES)}, got {out.name!r}")
    return out


class SynthWriter:
    def __init__(self, out: str | Path, mode: str, model_version: str):
        out = check_output(out)
        self.paths = output_paths(out)
        self.mode = mode
        self.model_version = model_version
        self.parquet = out.suffix.lower() == ".parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        self._rejected = open(self.paths["rejected"], "w")
        self._written_images: set[str] = set()
        if self.parquet:
            import pyarrow as pa  # noqa: PLC0415
            import pyarrow.parquet as pq  # noqa: PLC0415

            self._schema = pa.schema([("id", pa.string()), ("problem", pa.string()), ("images", pa.list_(pa.binary())),
                                      ("answer", pa.string()), ("seed_id", pa.string()), ("mode", pa.string()),
                                      ("model_version", pa.string()), ("majority_share", pa.float64()),
                                      ("blind_share", pa.float64())])
            self._data = pq.ParquetWriter(out, self._schema)
        else:
            self.paths["images"].mkdir(exist_ok=True)
            self._data = open(out, "w")

    def _image_refs(self, images: list[bytes]) -> list:
        if self.parquet:
            return list(images)
        refs = []
        for data in images:
            name = f"{hashlib.sha256(data).hexdigest()[:24]}.{_extension(data)}"
            if name not in self._written_images:
                (self.paths["images"] / name).write_bytes(data)
                self._written_images.add(name)
            refs.append(f"{self.paths['images'].name}/{name}")
        return refs

    def row(self, c: Candidate) -> dict:
        return {"id": f"{c.seed.id}-{self.mode}-{c.index}", "problem": problem_for(c.question, len(c.seed.images)),
                "images": self._image_refs(c.seed.images), "answer": "", "seed_id": c.seed.id, "mode": self.mode,
                "model_version": self.model_version, "majority_share": c.majority_share,
                "blind_share": c.blind_share}

    @staticmethod
    def rejected(c: Candidate) -> dict:
        return {"seed_id": c.seed.id, "index": c.index, "reason": c.reason, "detail": c.detail,
                "question": c.question, "reply": c.reply, "majority_share": c.majority_share,
                "majority_answer": c.majority_answer, "blind_share": c.blind_share}

    def write(self, candidates: list[Candidate]) -> None:
        rows = [self.row(c) for c in candidates if c.kept]
        for c in candidates:
            if not c.kept:
                self._rejected.write(json.dumps(self.rejected(c)) + "\n")
        self._rejected.flush()
        if self.parquet:
            import pyarrow as pa  # noqa: PLC0415

            if rows:
                self._data.write_table(pa.Table.from_pylist(rows, schema=self._schema))
        else:
            self._data.writelines(json.dumps(r) + "\n" for r in rows)
            self._data.flush()

    def close(self) -> None:
        self._data.close()
        self._rejected.close()
