"""The evaluation harness: scoring on fixed responses with known correctness, the metrics, benchmark
formats (the real MATH-V testmini file, MathVista- and We-Math-style files), and `mmupt eval` end to
end with the tiny model: locally, against a running server, and as a server-side job."""
from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from mmupt.cli import main
from mmupt.config import PromptSettings, load_settings
from mmupt.eval import (BenchmarkError, EvalItem, ItemResult, format_table, item_messages, load_benchmark,
                        problem_text, score_item, summarize)
from mmupt.services.voter.grading import make_grader
from rollout_support import TOKEN, png_bytes, serving


def find_math_v() -> Path | None:
    """../shared/data/math-v-testmini beside the checkout (or beside a worktree's parent)."""
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "data" / "math-v-testmini" / "testmini.jsonl"
        if candidate.is_file():
            return candidate
    return None


MATH_V = find_math_v()
needs_math_v = pytest.mark.skipif(MATH_V is None, reason="shared/data/math-v-testmini is not beside the checkout")


@pytest.fixture(scope="module")
def grader():
    return make_grader("exact")


# ---- scoring on fixed responses ---------------------------------------------------------------------
def test_multiple_choice_letters_are_scored_and_voted(grader):
    item = EvalItem(id="6", question="Which picture?", answer="D", options=list("ABCDE"))
    responses = ["The kittens match in picture D. \\boxed{D}", "\\boxed{(D)}", "so \\boxed{B}", "I think it is D."]
    result = score_item(item, responses, grader)
    assert result.correct == [True, True, False, False]   # no box: no answer, never correct
    assert result.answers == ["D", "(D)", "B", None]
    assert result.majority == "D" and result.majority_correct


def test_multiple_choice_with_option_texts_accepts_the_letter_or_the_text(grader):
    item = EvalItem(id="1", question="Find the angle.", answer="145°", options=["145°", "35°", "45°"])
    result = score_item(item, ["\\boxed{A}", "\\boxed{145°}", "\\boxed{35°}", "\\boxed{B}", "\\boxed{(B) 35°}"],
                        grader)
    assert result.correct == [True, True, False, False, False]
    assert result.majority == "B" and not result.majority_correct   # B has 3 votes: the majority is wrong


def test_free_form_answers(grader):
    item = EvalItem(id="5", question="Which number?", answer="61")
    responses = ["\\boxed{61}", "so \\boxed{ 61 }.", "\\boxed{\\text{61}}", "\\boxed{16}", "\\boxed{61"]
    result = score_item(item, responses, grader)
    assert result.correct == [True, True, True, False, False]       # a box that never closes is no answer
    assert result.majority == "61" and result.majority_correct


def test_metrics_overall_and_per_subject():
    def item(subject, correct, majority_correct):
        return ItemResult(id="x", subject=subject, gold="1", answers=[], correct=correct, majority=None,
                          majority_correct=majority_correct, responses=[])

    results = [item("algebra", [False, True, True], True), item("algebra", [False, False, True], False),
               item("counting", [True, True, True], True), item("counting", [False, False, False], False)]
    summary = summarize(results, 3)
    assert summary["overall"] == {"n": 4, "accuracy": 0.25, "avg@3": pytest.approx((2 + 1 + 3 + 0) / 12),
                                  "maj@3": 0.5, "pass@3": 0.75}
    assert summary["subjects"]["algebra"] == {"n": 2, "accuracy": 0.0, "avg@3": pytest.approx(0.5), "maj@3": 0.5,
                                              "pass@3": 1.0}
    assert summary["subjects"]["counting"]["pass@3"] == 0.5
    table = format_table(summary, 3).splitlines()
    assert table[0].split() == ["subject", "n", "accuracy", "avg@3", "maj@3", "pass@3"]
    assert table[2].split() == ["overall", "4", "25.0", "50.0", "50.0", "75.0"]


# ---- benchmark formats ------------------------------------------------------------------------------
@needs_math_v
def test_the_math_v_testmini_file_loads():
    items = load_benchmark(MATH_V)
    assert len(items) == 304 and len({i.subject for i in items}) == 16
    first = items[0]
    assert (first.id, first.answer, first.subject, len(first.images)) == ("4", "6", "counting", 1)
    assert "<image>" in first.question and "<image1>" not in first.question
    choice = next(i for i in items if i.id == "6")
    assert choice.options == list("ABCDE") and choice.answer == "D"
    assert problem_text(choice).endswith("Choices: A, B, C, D, E")


def test_mathvista_and_we_math_style_files(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png_bytes())
    # MathVista: a JSON object keyed by pid; choices are option texts, the answer is a text; task = subject.
    mathvista = {"1": {"pid": "1", "question": "Find the angle.", "image": "img/a.png", "choices": ["145°", "35°"],
                       "answer": "145°", "question_type": "multi_choice", "metadata": {"task": "geometry"}},
                 "2": {"pid": "2", "question": "How many?", "image": "img/a.png", "choices": None, "answer": "3",
                       "question_type": "free_form", "metadata": {"task": "counting"}}}
    (tmp_path / "mathvista.json").write_text(json.dumps(mathvista))
    a, b = load_benchmark(tmp_path / "mathvista.json")
    assert (a.id, a.options, a.answer, a.subject, len(a.images)) == ("1", ["145°", "35°"], "145°", "geometry", 1)
    assert (b.options, b.subject) == ([], "counting")
    assert problem_text(a) == "Find the angle.\nChoices:\n(A) 145°\n(B) 35°"
    # We-Math: a JSON list; options in one string; the knowledge concept is the subject.
    we_math = [{"ID": "3steps_3", "question": "What is the area?", "image_path": "img/a.png", "answer": "B",
                "option": "A. 200.96;B. 3215.36;C. 6280;D. 32; E. No correct answer",
                "knowledge concept": "Area of circles"}]
    (tmp_path / "we_math.json").write_text(json.dumps(we_math))
    (c,) = load_benchmark(tmp_path / "we_math.json")
    assert c.options == ["200.96", "3215.36", "6280", "32", "No correct answer"]
    assert (c.id, c.subject) == ("3steps_3", "Area of circles")


def test_broken_benchmark_files_name_the_item(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "1"}\n{"question": "no answer"}\n')
    with pytest.raises(BenchmarkError, match="item 1"):
        load_benchmark(bad)
    bad.write_text('{"question": "q", "answer": "1", "image": "missing.png"}\n')
    with pytest.raises(BenchmarkError, match="missing.png"):
        load_benchmark(bad)


def test_the_prompt_is_the_papers_with_images_in_placeholder_order():
    item = EvalItem(id="1", question="Compare <image> and <image>.", answer="1",
                    images=[png_bytes(color=(1, 2, 3)), png_bytes(color=(4, 5, 6))])
    (message,) = item_messages(item, PromptSettings())
    kinds = [p["type"] for p in message["content"]]
    assert kinds == ["text", "image_url", "text", "image_url", "text", "text"]
    assert message["content"][-1]["text"] == PromptSettings().suffix   # the paper's suffix closes the turn
    assert message["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")


# ---- end to end -----------------------------------------------------------------------------------------
def eval_args(source: list[str], out: Path, limit: int = 3) -> list[str]:
    return ["eval", *source, "--benchmark", str(MATH_V), "--limit", str(limit), "--k", "2", "--max-tokens", "6",
            "--grader", "exact", "--out", str(out)]


def check_result(out: Path, items: int) -> dict:
    result = json.loads((out / "result.json").read_text())
    assert result["items"] == items and result["config"]["k"] == 2
    assert all(len(r["correct"]) == 2 and len(r["responses"]) == 2 for r in result["per_item"])
    assert result["summary"]["overall"]["n"] == items
    assert (out / "table.txt").read_text().startswith("subject")
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"
    return result


@needs_math_v
def test_mmupt_eval_runs_end_to_end_with_the_tiny_model(tiny_model_dir, tmp_path, capsys):
    assert main(eval_args(["--model", str(tiny_model_dir), "--config", str(tmp_config(tmp_path))],
                          tmp_path / "out")) == 0
    check_result(tmp_path / "out", 3)
    assert "overall" in capsys.readouterr().out


@needs_math_v
def test_mmupt_eval_against_a_server_and_as_a_server_job(tiny_model_dir, tmp_path):
    from mmupt.services.rollout.api import RolloutServer, build_app
    from mmupt.services.rollout.hf_backend import TransformersBackend

    settings = load_settings(environ={}, overrides={
        "model": {"path": str(tiny_model_dir), "device": "cpu"}, "voter": {"grader": "exact"},
        "rollout": {"allowed_local_dirs": [str(MATH_V.parent)], "max_new_tokens": 6}, "auth": {"token": TOKEN}})
    server = RolloutServer(settings, TOKEN)
    server.attach(TransformersBackend(settings.model))
    try:
        with serving(build_app(server)) as url:
            assert main(eval_args(["--url", url], tmp_path / "http", limit=2)) == 0
            check_result(tmp_path / "http", 2)

            job = {"benchmark": str(MATH_V), "k": 2, "limit": 2, "max_tokens": 6}
            assert httpx.post(f"{url}/v1/eval", json=job).status_code == 401
            outside = httpx.post(f"{url}/v1/eval", json=job | {"benchmark": str(tmp_config(tmp_path))},
                                 headers={"Authorization": f"Bearer {TOKEN}"})
            assert outside.status_code == 403
            started = httpx.post(f"{url}/v1/eval", json=job, headers={"Authorization": f"Bearer {TOKEN}"})
            assert started.status_code == 202, started.text
            job_id = started.json()["id"]
            deadline = time.monotonic() + 120
            while (status := httpx.get(f"{url}/v1/eval/{job_id}").json())["status"] == "running":
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert status["status"] == "finished", status["error"]
            assert status["done"] == status["total"] == 2
            assert status["result"]["summary"]["overall"]["n"] == 2 and status["result"]["policy_version"] == 0
            assert httpx.get(f"{url}/v1/eval/nope").status_code == 404
    finally:
        server.close()


def tmp_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text("voter:\n  grader: exact\n")
    return path
