"""`mmupt synth` through the real tiny model (in this process and through a rollout server): both
modes, every filter on the model's own outputs where they can be provoked, the report's accounting,
and the training format read back by the data loader.

The tiny model writes nonsense and never a \\boxed{} answer, so the tests switch the marker rule off
(`require_marker: false`) where they need questions to reach the later filters, and steer the rest:
a near-zero temperature makes every sample alike (duplicates), a seed file holding the model's own
question provokes duplicates of the seed, word bounds provoke the length filter, a positive
majority threshold the self-consistency filter, and a server whose `n` limit is below G refuses the
answer samples (sampling errors).
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from mmupt.cli import main
from mmupt.config import load_settings
from mmupt.data import load_items
from mmupt.embedded_redis import free_port
from mmupt.sampler import LocalSampler
from mmupt.services.rollout.api import RolloutServer, build_app
from mmupt.services.rollout.hf_backend import TransformersBackend
from mmupt.services.voter.grading import make_grader
from mmupt.synth.command import run_synthesis
from mmupt.synth.filters import REASONS
from mmupt.synth.pipeline import Synthesizer
from rollout_support import TOKEN, serving
from test_eval import MATH_V, needs_math_v

LENIENT = {"require_marker": False, "min_words": 1, "min_majority_share": 0.0, "questions_per_seed": 3,
           "max_tokens": 12, "answer_samples": 2, "seeds_per_batch": 2}


def synth_settings(settings, **synth):
    settings = settings.model_copy(deep=True)
    for name, value in {**LENIENT, **synth}.items():
        setattr(settings.synth, name, value)
    return settings


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_accounted(report: dict) -> None:
    assert report["status"] == "finished" and report["accounted"]
    assert report["generated"] == report["kept"] + sum(report["dropped"].values())
    assert set(report["dropped"]) == set(REASONS)
    rejected = read_jsonl(Path(report["outputs"]["rejected"]))
    assert len(rejected) == report["generated"] - report["kept"]
    assert all(line["reason"] in REASONS and line["detail"] for line in rejected)
    assert Path(report["outputs"]["plot"]).stat().st_size > 0
    assert json.loads(Path(report["outputs"]["report"]).read_text()) == report


def test_direct_mode_writes_training_rows_with_provenance_through_every_filter(settings, shapes_dir, tmp_path):
    out = tmp_path / "direct.jsonl"
    report = run_synthesis(synth_settings(settings), shapes_dir / "train.jsonl", out, mode="direct", limit=4,
                           show_bar=False)
    assert_accounted(report)
    assert report["seeds"] == 4 and report["generated"] == 4 * 3 and report["kept"] > 0
    assert all(report["checked"][name] > 0 for name in ("parse", "length", "dedup", "answerability", "image"))
    rows = read_jsonl(out)
    seeds = {item.id: item for item in load_items(shapes_dir / "train.jsonl")}
    for row in rows:
        assert row["answer"] == "" and row["mode"] == "direct"
        assert row["model_version"] == str(Path(settings.model.path).resolve())
        assert row["problem"].startswith("<image>") and row["problem"].count("<image>") == 1
        assert row["seed_id"] in seeds and isinstance(row["majority_share"], float)
        assert isinstance(row["blind_share"], float)
    # The training loader reads it as is: images resolved beside the file, no answer.
    items = load_items(out)
    assert len(items) == report["kept"] == len(rows)
    assert {item.id for item in items} == {row["id"] for row in rows}
    for item, row in zip(items, rows):
        assert item.answer is None and item.images == seeds[row["seed_id"]].images


@needs_math_v
def test_in_context_mode_on_math_v_to_parquet_and_a_refused_seed_loses_nothing(settings, tmp_path):
    rows = [json.loads(line) for line in MATH_V.read_text().splitlines()[:3]]
    rows.append({**rows[0], "id": "huge", "question": "Which one? " * 3000})  # over max_prompt_tokens
    seed_file = tmp_path / "seeds.jsonl"
    seed_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = synth_settings(settings, require_marker=True, seeds_per_batch=4)  # the default parse rule
    settings.data.problem_column, settings.data.images_column = "question", "image"
    settings.data.image_root = str(MATH_V.parent)
    report = run_synthesis(settings, seed_file, tmp_path / "in-context.parquet", mode="in-context", show_bar=False)
    assert_accounted(report)
    assert report["seeds"] == 4 and report["generated"] == 3 * 3  # the refused seed generated nothing
    [failed] = report["seeds_failed"]
    assert failed["seed_id"] == "huge" and "token" in failed["reason"]
    # The tiny model writes no "Question:" line: every question is unparseable, and counted as such.
    assert report["dropped"]["unparseable"] == report["generated"] - report["kept"]
    table = pq.read_table(tmp_path / "in-context.parquet")
    assert table.schema.names[:4] == ["id", "problem", "images", "answer"]
    assert table.num_rows == report["kept"]


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    """The tiny model in this process, loaded once for the module."""
    sampler = LocalSampler(load_settings(environ={}, overrides={"model": {"path": str(tiny_model_dir), "device": "cpu"}}))
    yield sampler
    sampler.close()


def test_duplicates_length_and_self_consistency_drops_from_the_model_itself(settings, shapes_dir, local):
    grader = make_grader("exact")
    try:
        # Near-greedy sampling: a seed's samples are alike, so all but the first are duplicates.
        greedy = synth_settings(settings, temperature=1e-3, questions_per_seed=3)
        [seed] = load_items(shapes_dir / "train.jsonl")[:1]
        candidates, _ = Synthesizer(greedy, grader, "direct").run(local, [seed])
        assert [c.reason for c in candidates] == [None, "duplicate", "duplicate"]
        question = candidates[0].question
        # A seed that already asks the model's question: the model's question duplicates the seed.
        same_image = [seed.__class__(id="mine", problem="<image>" + question, images=seed.images)]
        candidates, _ = Synthesizer(greedy, grader, "direct").run(local, same_image)
        assert [c.reason for c in candidates] == ["duplicate_of_seed"] * 3

        strict = synth_settings(settings, min_words=10_000)
        candidates, _ = Synthesizer(strict, grader, "in-context").run(local, [seed])
        assert {c.reason for c in candidates} == {"too_short"}
        short = synth_settings(settings, max_words=1, min_words=0, questions_per_seed=8)
        candidates, _ = Synthesizer(short, grader, "direct").run(local, [seed])
        assert "too_long" in {c.reason for c in candidates}
        # The tiny model never boxes an answer: any positive majority threshold drops what reaches it.
        consistent = synth_settings(settings, min_majority_share=0.01)
        candidates, _ = Synthesizer(consistent, grader, "direct").run(local, [seed])
        assert {c.reason for c in candidates} == {"unanswerable"}
        assert all(c.majority_share == 0.0 and "share 0.00" in c.detail for c in candidates)
    finally:
        grader.close()


@pytest.fixture(scope="module")
def server_url(tiny_model_dir):
    settings = load_settings(environ={}, overrides={
        "model": {"path": str(tiny_model_dir), "device": "cpu"}, "rollout": {"max_request_n": 3},
        "voter": {"grader": "exact"}, "auth": {"token": TOKEN}})
    server = RolloutServer(settings, TOKEN)
    server.attach(TransformersBackend(settings.model))
    with serving(build_app(server)) as url:
        yield url
    server.close()


def test_the_command_against_a_rollout_server(server_url, shapes_dir, tmp_path, capsys):
    config = tmp_path / "synth.yaml"
    # G = 4 answers per question, over the server's limit of n = 3: every answer request is refused.
    config.write_text(yaml.safe_dump({"synth": {**LENIENT, "questions_per_seed": 2, "answer_samples": 4},
                                      "rollout": {"max_new_tokens": 8}}))
    out = tmp_path / "served.jsonl"
    code = main(["synth", "--mode", "direct", "--seed-data", str(shapes_dir / "train.jsonl"), "--out", str(out),
                 "--url", server_url, "--limit", "2", "--config", str(config)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "served.report.json").read_text())
    assert_accounted(report)
    assert report["model_version"].endswith("@v0")
    dropped = report["dropped"]
    assert dropped["sampling_error"] == report["generated"] - dropped["duplicate"] - dropped["unparseable"] > 0
    assert any("over the limit" in line["detail"] for line in read_jsonl(tmp_path / "served.rejected.jsonl"))
    assert "2 seeds, 4 questions generated" in capsys.readouterr().out

    code = main(["synth", "--seed-data", str(shapes_dir / "train.jsonl"), "--out", str(tmp_path / "x.csv"),
                 "--url", server_url, "--config", str(config)])
    assert code == 1 and "must end with .jsonl or .parquet" in capsys.readouterr().err
    code = main(["synth", "--seed-data", str(tmp_path / "missing.jsonl"), "--out", str(out), "--url", server_url])
    assert code == 1 and "data file not found" in capsys.readouterr().err
    nobody = f"http://127.0.0.1:{free_port()}"
    code = main(["synth", "--seed-data", str(shapes_dir / "train.jsonl"), "--out", str(tmp_path / "gone.jsonl"),
                 "--url", nobody, "--limit", "1", "--config", str(config)])
    assert code == 1 and f"cannot reach {nobody}" in capsys.readouterr().err
    assert json.loads((tmp_path / "gone.report.json").read_text())["status"] == "failed"
