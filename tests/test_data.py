"""The real data-set formats (parquet and JSONL as MM-UPT/EasyR1 ship them) and every bad-input case.

The files are small and written by the tests; images are real PNGs decoded by the loader.
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmupt.config import DataSettings, StreamSettings
from mmupt.data import DataError, load_items, load_jsonl

MATH_V = Path(__file__).resolve().parents[2] / "shared" / "data" / "math-v-testmini" / "testmini.jsonl"  # ../shared


def png(color: str, size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_parquet_with_embedded_bytes_lists_and_answers(tmp_path):
    red, blue = png("red"), png("blue")
    path = write_parquet(tmp_path / "mmr1.parquet", [
        {"problem": "<image>What color is it?", "images": [red], "answer": "red"},
        {"problem": "Compare <image> and <image>.", "images": [red, blue], "answer": "B"},
    ])
    items = load_items(path)
    assert [len(i.images) for i in items] == [1, 2]
    assert items[1].images == [red, blue]  # order kept: first image for the first placeholder
    assert [i.answer for i in items] == ["red", "B"]
    assert items[0].id == "mmr1-1" and items[1].id == "mmr1-2"


def test_parquet_hf_datasets_image_structs(tmp_path):
    """`datasets` stores an Image feature as {"bytes", "path"}: bytes win, a path alone is read."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "g.png").write_bytes(png("green"))
    path = write_parquet(tmp_path / "geo.parquet", [
        {"problem": "<image>Find x.", "images": [{"bytes": png("red"), "path": "ignored.png"}], "answer": "3"},
        {"problem": "<image>Find y.", "images": [{"bytes": None, "path": "imgs/g.png"}], "answer": "4"},
    ])
    items = load_items(path)
    assert items[0].images == [png("red")]
    assert items[1].images == [png("green")]


def test_jsonl_paths_single_or_list_relative_to_image_root_and_data_urls(tmp_path):
    root = tmp_path / "pics"
    root.mkdir()
    (root / "a.png").write_bytes(png("red"))
    (root / "b.png").write_bytes(png("blue"))
    data_url = "data:image/png;base64," + base64.b64encode(png("white")).decode()
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"id": "q1", "problem": "<image>Area?", "images": "a.png"},
        {"id": "q2", "problem": "<image><image>Which is larger?", "images": ["a.png", str(root / "b.png")],
         "options": ["A", "B"]},
        {"id": "q3", "problem": "<image>Color?", "images": [data_url]},
    ])
    items = load_items(path, DataSettings(image_root=str(root)))
    assert [i.id for i in items] == ["q1", "q2", "q3"]
    assert items[1].images == [png("red"), png("blue")] and items[1].options == ["A", "B"]
    assert items[2].images == [png("white")]
    assert all(i.answer is None for i in items)  # label-free data: no answer column is fine


def test_configurable_column_names(tmp_path):
    path = write_parquet(tmp_path / "custom.parquet", [
        {"uid": 7, "question": "<image>How many sides?", "pictures": [png("red")], "solution": "4",
         "choices": ["3", "4"]},
    ])
    cfg = DataSettings(problem_column="question", images_column="pictures", answer_column="solution",
                       id_column="uid", options_column="choices")
    [item] = load_items(path, cfg)
    assert (item.id, item.problem, item.answer, item.options) == ("7", "<image>How many sides?", "4", ["3", "4"])


def test_json_list_file_and_no_placeholder_means_images_first(tmp_path):
    (tmp_path / "a.png").write_bytes(png("red"))
    path = tmp_path / "bench.json"
    path.write_text(json.dumps([{"problem": "What shape is shown?", "images": ["a.png"], "answer": "square"}]))
    [item] = load_items(path)
    assert item.images == [png("red")] and item.answer == "square"


def test_load_jsonl_keeps_working_for_the_synthetic_task(shapes_dir):
    items = load_jsonl(shapes_dir / "train.jsonl")
    assert len(items) == 64 and items[0].id.startswith("train-") and len(items[0].images) == 1


# ---- bad input: each case fails with the file, the row and the reason ------------------------------
def test_missing_column_in_parquet_names_it_and_the_setting(tmp_path):
    path = write_parquet(tmp_path / "x.parquet", [{"question": "<image>?", "images": [png("red")]}])
    with pytest.raises(DataError, match=r"no column 'problem' \(columns: question, images\); set data.problem_column"):
        load_items(path)


def test_missing_field_in_jsonl_names_the_line(tmp_path):
    (tmp_path / "a.png").write_bytes(png("red"))
    path = write_jsonl(tmp_path / "y.jsonl", [{"problem": "<image>?", "images": ["a.png"]}, {"problem": "no image"}])
    with pytest.raises(DataError, match=r"y.jsonl: line 2: no 'images' field \(fields: problem\); "
                                        r"set data.images_column"):
        load_items(path)


def test_unreadable_embedded_image(tmp_path):
    path = write_parquet(tmp_path / "bad.parquet", [
        {"problem": "<image>ok", "images": [png("red")]},
        {"problem": "<image>broken", "images": [b"\x89PNG\r\n\x1a\n truncated"]},
    ])
    with pytest.raises(DataError, match=r"bad.parquet: row 2: image 1 is unusable: not a readable image"):
        load_items(path)


def test_missing_image_file(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"problem": "<image>?", "images": ["nowhere.png"]}])
    with pytest.raises(DataError, match=r"line 1: image 1 is unusable: cannot read image file .*nowhere.png"):
        load_items(path)


def test_image_over_the_pixel_limit(tmp_path):
    path = write_parquet(tmp_path / "big.parquet", [{"problem": "<image>?", "images": [png("red", (200, 200))]}])
    with pytest.raises(DataError, match=r"row 1: image 1 is unusable: image is 200x200 pixels, over the limit"):
        load_items(path, limits=StreamSettings(max_image_pixels=100 * 100))


def test_placeholders_that_do_not_match_the_images(tmp_path):
    path = write_parquet(tmp_path / "x.parquet", [
        {"problem": "<image>one", "images": [png("red")]},
        {"problem": "Compare <image> and <image>.", "images": [png("red")]},
    ])
    with pytest.raises(DataError, match=r"x.parquet: row 2: problem has 2 <image> placeholders but 1 images"):
        load_items(path)
    path = write_jsonl(tmp_path / "x.jsonl", [{"problem": "<image>?", "images": []}])
    with pytest.raises(DataError, match=r"x.jsonl: line 1: problem has 1 <image> placeholders but 0 images"):
        load_items(path)


def test_hf_struct_without_bytes_or_path_and_bad_data_url(tmp_path):
    path = write_parquet(tmp_path / "x.parquet", [{"problem": "<image>?", "images": [{"bytes": None, "path": None}]}])
    with pytest.raises(DataError, match="neither 'bytes' nor 'path'"):
        load_items(path)
    path = write_jsonl(tmp_path / "x.jsonl", [{"problem": "<image>?", "images": ["data:image/png;base64,@@@"]}])
    with pytest.raises(DataError, match="invalid base64"):
        load_items(path)


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_items(tmp_path / "none.parquet")
    (tmp_path / "x.csv").write_text("problem,images\n")
    with pytest.raises(DataError, match=r"unknown data format '.csv'"):
        load_items(tmp_path / "x.csv")
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable parquet file"):
        load_items(tmp_path / "x.parquet")
    (tmp_path / "x.jsonl").write_text('{"problem": "<image>?"\n')
    with pytest.raises(DataError, match=r"x.jsonl:1: not valid JSON"):
        load_items(tmp_path / "x.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no items"):
        load_items(tmp_path / "e.jsonl")


@pytest.mark.skipif(not MATH_V.is_file(), reason="the shared MATH-V testmini file is not on this machine")
def test_real_benchmark_file_with_mapped_columns():
    items = load_items(MATH_V, DataSettings(problem_column="question", images_column="image"))
    assert len(items) == 304 and all(len(i.images) == 1 for i in items)
    assert sum(bool(i.options) for i in items) > 0 and all(i.answer for i in items)
