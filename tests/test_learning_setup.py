"""The pieces of the learning demo: the shapes task's question types, the weak base model's recipe,
and held-out accuracy as `mmupt run` reports it."""
from __future__ import annotations

import json
import random

import pytest

from mmupt import shapes_task
from mmupt.eval import heldout_accuracy, load_benchmark
from mmupt.make_base import BASE_MARKER, BaseRecipe, build_base


@pytest.mark.parametrize("question_type", shapes_task.QUESTION_TYPES)
def test_every_question_type_has_its_answer_in_its_answer_space(question_type):
    rng = random.Random(0)
    for _ in range(30):
        image, question, answer = shapes_task.make_item(rng, question_type)
        assert answer in shapes_task.answer_space(question_type), (question, answer)
        assert image.size == (112, 112) and question.endswith("?")
        assert f"\\boxed{{{answer}}}" in shapes_task.response(question_type, answer)


def test_colour_answers_match_the_pixels():
    rng = random.Random(1)
    for _ in range(20):
        image, _, answer = shapes_task.make_item(rng, "color")
        colours = {rgb for _, rgb in image.getcolors(maxcolors=1 << 16) if rgb != (255, 255, 255)}
        assert shapes_task.COLORS[answer] in colours


def test_dataset_question_types_are_chosen_and_checked(tmp_path):
    train, _ = shapes_task.write_dataset(tmp_path, 20, 4, questions=["count", "count_kind"])
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    assert all("How many" in r["problem"] for r in rows) and all(r["answer"].isdigit() for r in rows)
    with pytest.raises(ValueError, match="colour"):
        shapes_task.write_dataset(tmp_path, 2, 2, questions=["colour"])


def test_make_base_builds_a_loadable_model_and_records_its_recipe(tmp_path):
    from transformers import AutoModelForImageTextToText

    recipe = BaseRecipe(clean_steps=2, noisy_steps=2, batch_size=4)
    path = build_base(tmp_path / "base", recipe)
    record = json.loads((path / BASE_MARKER).read_text())
    assert record["label_noise"] == recipe.label_noise and record["clean_steps"] == 2
    assert set(record["final_loss"]) == {"clean", "noisy"}
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert model.config.text_config.hidden_size == recipe.hidden


def test_heldout_accuracy_reports_sampled_majority_and_greedy(settings, shapes_dir):
    items = load_benchmark(shapes_dir / "test.jsonl", limit=3)
    result = heldout_accuracy(settings, items, k=2, temperature=1.0, max_tokens=6)
    assert result["k"] == 2 and result["n"] == 3 and result["temperature"] == 1.0
    assert all(0.0 <= result[m] <= 1.0 for m in ("accuracy", "greedy_accuracy", "maj_accuracy"))
    # Greedy decoding is deterministic: the same figure twice.
    again = heldout_accuracy(settings, items, k=2, temperature=1.0, max_tokens=6, seed=7)
    assert again["greedy_accuracy"] == result["greedy_accuracy"]

