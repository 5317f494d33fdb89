"""Synthetic-question filters on fixed model outputs (a model cannot be steered to write these):
parsing, length, duplicates, self-consistency and image need, with votes from the real voter."""
from __future__ import annotations

import json

import pytest

from mmupt.data import load_items
from mmupt.services.voter.grading import make_grader
from mmupt.services.voter.vote import vote
from mmupt.synth.filters import (REASONS, Deduper, answerability_verdict, content_words, image_verdict,
                                 length_verdict, normalize, similarity)
from mmupt.synth.pipeline import Candidate, SeedFailure
from mmupt.synth.prompts import parse_question, synthesis_messages
from mmupt.synth.report import AccountingError, SynthReport
from mmupt.data import Item


@pytest.fixture(scope="module")
def grader():
    grader = make_grader("mathruler")
    yield grader
    grader.close()


def boxed(*answers: str) -> list[str]:
    return [f"Reasoning... so the answer is \\boxed{{{a}}}." if a else "I am not sure." for a in answers]


# ---- parsing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("reply, question", [
    ("Question: How many red circles are there?", "How many red circles are there?"),
    ("Sure! Here it is.\nNew question: What is the area of the triangle?", "What is the area of the triangle?"),
    ("**New question:** How many squares touch the left edge?", "How many squares touch the left edge?"),
    ("Question: How many shapes?\nQuestion: How many blue shapes are there?", "How many blue shapes are there?"),
    ("Question: How many circles are there? Answer: 3", "How many circles are there?"),
    ("New question: What is x?\nSolution: x = 2, so \\boxed{2}", "What is x?"),
    ("Question: \"<image>How many triangles are in <image1> the picture?\"",
     "How many triangles are in  the picture?"),
    ("question: what fraction of the square is shaded?", "what fraction of the square is shaded?"),
    ("Question: Which is longest?\n(A) 1 cm\n(B) 2 cm\n\nThis tests measuring.", "Which is longest?\n(A) 1 cm\n(B) 2 cm"),
])
def test_the_question_is_read_after_the_last_marker_and_before_any_answer(reply, question):
    assert parse_question(reply) == (question, "")


@pytest.mark.parametrize("reply, why", [
    ("How many circles are there?", "marker"),
    ("Subquestion: none", "marker"),
    ("Question:   \n", "nothing after"),
    ("Question: How many \ufffd\ufffd shapes?", "U+FFFD"),
    ("Question: How many\x07 shapes?", "control"),
])
def test_unparseable_replies_say_why(reply, why):
    question, reason = parse_question(reply)
    assert question is None and why in reason


def test_without_the_marker_requirement_the_whole_reply_is_the_question():
    assert parse_question("  How many\x07 shapes are there?  ", require_marker=False) == \
        ("How many shapes are there?", "")
    assert parse_question(" \x00 ", require_marker=False)[0] is None


def test_the_in_context_prompt_shows_question_choices_and_answer_and_direct_shows_the_image_only():
    seed = Item(id="s", problem="<image>Which option is largest?", images=[b"png"], answer="B",
                options=["1 cm", "2 cm"])
    [message] = synthesis_messages("in-context", seed)
    text = message["content"][-1]["text"]
    assert message["content"][0]["type"] == "image_url"
    assert "Question: Which option is largest?\nChoices:\n(A) 1 cm\n(B) 2 cm" in text
    assert "Answer: B" in text and "<image>" not in text and "New question:" in text
    [direct] = synthesis_messages("direct", seed)
    assert "Which option" not in direct["content"][-1]["text"]
    assert [p["type"] for p in direct["content"]] == ["image_url", "text"]
    with pytest.raises(ValueError, match="unknown synthesis mode"):
        synthesis_messages("sideways", seed)


# ---- length ------------------------------------------------------------------------------------
def test_length_bounds_in_words_and_zero_switches_them_off():
    assert length_verdict("How many?", 4, 150)[0] == "too_short"
    assert length_verdict("How many red shapes are there?", 4, 150) is None
    assert length_verdict("word " * 151, 4, 150)[0] == "too_long"
    assert length_verdict("Why?", 0, 0) is None


# ---- duplicates --------------------------------------------------------------------------------
def test_normalised_text_and_content_words():
    assert normalize("  How MANY  circles, in total?") == "how many circles in total"
    assert normalize("What is 3+4?") != normalize("What is 3-4?")  # maths symbols matter
    assert content_words("How many shapes are in the image?") == content_words("How many shapes are shown in the picture")
    assert similarity(content_words("How many red shapes are there?"),
                      content_words("How many blue shapes are there?")) < 0.8


def test_duplicates_of_the_seed_and_of_each_other_per_image():
    dedup = Deduper(threshold=0.8)
    dedup.add_seed("img1", "How many shapes are in the image?")
    assert dedup.verdict("img1", "how many shapes are in the image")[0] == "duplicate_of_seed"
    reason, detail = dedup.verdict("img1", "How many shapes are shown in the picture?")
    assert reason == "duplicate_of_seed" and "similarity 1.00" in detail
    assert dedup.verdict("img2", "How many shapes are in the image?") is None  # another image: a new item
    assert dedup.verdict("img1", "How many red shapes are there?") is None
    dedup.add("img1", "How many red shapes are there?")
    assert dedup.verdict("img1", "How many RED shapes are there?")[0] == "duplicate"
    assert dedup.verdict("img1", "How many blue shapes are there?") is None
    assert dedup.verdict("img1", "What is 3+4?") is None
    dedup.add("img1", "What is 3+4?")
    assert dedup.verdict("img1", "What is 3-4?") is None


# ---- self-consistency and image need (votes by the real voter) ---------------------------------
def test_answerability_keeps_strong_majorities_and_optionally_drops_unanimous_ones(grader):
    strong = vote(boxed("3", "3", "3", "4"), grader)
    weak = vote(boxed("1", "2", "3", "3", "4"), grader)  # share 0.4
    silent = vote(boxed("", "", "", ""), grader)
    unanimous = vote(boxed("\\frac{1}{2}", "0.5", "1/2", "\\frac{1}{2}"), grader)
    assert answerability_verdict(strong, 0.5, drop_unanimous=False) is None
    assert answerability_verdict(weak, 0.5, drop_unanimous=False)[0] == "unanswerable"
    reason, detail = answerability_verdict(silent, 0.5, drop_unanimous=False)
    assert reason == "unanswerable" and "100%" in detail
    assert answerability_verdict(unanimous, 0.5, drop_unanimous=False) is None
    assert answerability_verdict(unanimous, 0.5, drop_unanimous=True)[0] == "unanimous"
    assert answerability_verdict(silent, 0.0, drop_unanimous=False) is None  # threshold 0: off


def test_a_question_answered_alike_without_the_image_does_not_need_it(grader):
    with_image = vote(boxed("5", "5", "5", "2"), grader)
    assert image_verdict(with_image, vote(boxed("5", "5", "5", "5"), grader), grader.equal, 0.0)[0] == "no_image_needed"
    assert image_verdict(with_image, vote(boxed("5.0", "5", "5", "1"), grader), grader.equal, 0.0)[0] == "no_image_needed"
    # Without the image the model guesses something else, or the same less consistently: it needs the image.
    assert image_verdict(with_image, vote(boxed("7", "7", "7", "7"), grader), grader.equal, 0.0) is None
    assert image_verdict(with_image, vote(boxed("5", "5", "1", "2"), grader), grader.equal, 0.0) is None
    assert image_verdict(with_image, vote(boxed("5", "5", "1", "2"), grader), grader.equal, 0.25)[0] == "no_image_needed"
    assert image_verdict(with_image, vote(boxed("", "", "", ""), grader), grader.equal, 0.0) is None


# ---- the report --------------------------------------------------------------------------------
def test_the_report_accounts_for_every_generated_question():
    seed = Item(id="s1", problem="<image>q", images=[b"x"])
    kept = Candidate(seed, 0, "Question: a b c d", question="a b c d", checks=["parse", "length"], majority_share=0.75)
    dropped = [Candidate(seed, i + 1, "r", reason=reason, checks=["parse"]) for i, reason in enumerate(REASONS)]
    report = SynthReport("direct", "m")
    report.add(2, [kept, *dropped], [SeedFailure("s2", "refused")])
    summary = report.as_dict()
    assert summary["generated"] == 1 + len(REASONS) and summary["kept"] == 1
    assert summary["accounted"] and all(n == 1 for n in summary["dropped"].values())
    assert summary["checked"]["parse"] == 1 + len(REASONS) and summary["checked"]["length"] == 1
    assert summary["seeds_failed"] == [{"seed_id": "s2", "reason": "refused"}]
    assert json.loads(json.dumps(summary)) == summary
    report.generated += 1  # a question that went nowhere is a bug, and says so
    with pytest.raises(AccountingError):
        report.check()


def test_an_empty_answer_is_no_answer(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    rows = [{"problem": "<image>q1", "images": ["a.png"], "answer": ""},
            {"problem": "<image>q2", "images": ["a.png"], "answer": "0"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [item.answer for item in load_items(tmp_path / "d.jsonl")] == [None, "0"]


def test_the_synth_section_takes_environment_overrides_and_names_bad_fields():
    from mmupt.config import ConfigError, load_settings

    settings = load_settings(environ={"MMUPT_SYNTH__RATIO": "0.25", "MMUPT_SYNTH__MODE": "in-context"})
    assert (settings.synth.ratio, settings.synth.mode) == (0.25, "in-context")
    with pytest.raises(ConfigError, match="synth.ratio"):
        load_settings(environ={"MMUPT_SYNTH__RATIO": "1.5"})
    with pytest.raises(ConfigError, match="synth.mode"):
        load_settings(overrides={"synth": {"mode": "sideways"}}, environ={})
