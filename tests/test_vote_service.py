"""The voter as a service and a command: the streams against a real server, POST /v1/vote, `mmupt vote`."""
import json
import threading

import pytest
from fastapi.testclient import TestClient

from mmupt.cli import main as mmupt_main
from mmupt.services.voter.grading import make_grader
from mmupt.services.voter.main import Voter, vote_app
from mmupt.streams import Streams, connect
from mmupt.wire import GroupMsg, PromptMsg, Response, Sampling, ScoredMsg, decode, encode, pack_floats, pack_ids

from learner_support import make_learner

TIE = ["\\boxed{2}", "\\boxed{3}"]
MAJORITY = ["\\boxed{2}", "\\boxed{2}"]


@pytest.fixture(scope="module")
def grader():
    g = make_grader("mathruler")
    g.start(wait=True)
    yield g
    g.close()


def group_for(prompt: PromptMsg, texts: list[str]) -> GroupMsg:
    """What a rollout server would append for this prompt, with chosen response texts."""
    responses = [Response(token_ids=pack_ids([5, 6]), logprobs=pack_floats([-0.5, -1.0]), text=t, finish_reason="stop")
                 for t in texts]
    return GroupMsg(group_id=prompt.group_id, prompt_id=prompt.prompt_id, problem=prompt.problem,
                    image_hashes=prompt.image_hashes, prompt_ids=pack_ids([1, 2, 3]), policy_version=0,
                    sampling=Sampling(n=len(texts), temperature=1.0, top_p=1.0, max_new_tokens=8),
                    responses=responses, hidden_answer=prompt.hidden_answer)


def test_dropped_groups_reach_the_learner_and_are_counted_not_trained(settings, grader):
    settings.voter.tie_policy = "drop"
    streams = Streams(connect(settings.redis_url), settings.run_id, settings.streams)
    streams.ensure_groups()
    learner = make_learner(settings)
    learner.start()
    stop = threading.Event()
    admitted = learner.admit(stop)
    assert admitted == 4

    # Play the rollout server: every other group is a tie.
    for i, entry in enumerate(streams.read("prompts", "rollout-test", count=admitted)):
        prompt = decode(entry.payload, PromptMsg)
        streams.append_and_ack("groups", [encode(group_for(prompt, TIE if i % 2 else MAJORITY))], "prompts", [entry.id])
    Voter(settings, streams, grader=grader).step(stop)

    scored = [decode(fields[b"m"], ScoredMsg) for _, fields in streams.r.xrange(streams.keys.scored)]
    assert len(scored) == 4  # every group is emitted, the dropped ones too
    assert sorted(s.vote.drop_reason or "" for s in scored) == ["", "", "tie", "tie"]
    assert all(s.vote.rewards == [0.0, 0.0] for s in scored if s.vote.drop_reason)

    for _ in range(4):
        learner.collect()
    counts = learner.ledger.counters()
    assert counts["dropped_vote"] == 2 and len(learner.buffer) == 2
    assert all(s.vote.drop_reason is None for _, s in learner.buffer)
    assert counts["admitted"] == counts["trained"] + counts["dropped_stale"] + counts["dropped_vote"] \
        + counts["skipped_zero_advantage"] + counts["deadlettered"] + counts["in_flight"]
    # dropped groups are acked and deleted; the two buffered ones wait for their training step
    assert streams.pending_counts()["scored"] == {"length": 2, "pending": 2}


def test_ground_truth_group_without_label_goes_to_dead_letter(settings, grader):
    settings.voter.reward_mode = "ground_truth"
    streams = Streams(connect(settings.redis_url), settings.run_id, settings.streams)
    streams.ensure_groups()
    prompt = PromptMsg(group_id="0:0", prompt_id="p", problem="<image>How many?")
    streams.append("groups", [encode(group_for(prompt, MAJORITY))])
    Voter(settings, streams, grader=grader).step(threading.Event())
    dead = streams.r.xrange(streams.keys.deadletter)
    assert len(dead) == 1 and b"needs the hidden answer" in dead[0][1][b"reason"]
    assert streams.pending_counts()["groups"] == {"length": 0, "pending": 0}


def test_post_vote(settings, grader):
    client = TestClient(vote_app(settings, grader))
    body = {"id": "q1", "responses": ["\\boxed{0.5}", "so \\boxed{\\frac{1}{2}}", "\\boxed{3}", "no idea"],
            "answer": "1/2"}
    reply = client.post("/v1/vote", json=body)
    assert reply.status_code == 200, reply.text
    out = reply.json()
    assert out["id"] == "q1" and out["majority"] == "0.5" and out["rewards"] == [1, 1, 0, 0]
    assert out["majority_ratio"] == 0.5 and out["label_correct"] is True and out["no_answer_rate"] == 0.25
    assert out["reward_accuracy"] == 1.0 and out["dropped"] is False

    choice = client.post("/v1/vote", json={"responses": ["\\boxed{B}", "\\boxed{(B) 5 cm}", "\\boxed{A}"],
                                           "options": ["3 cm", "5 cm"]}).json()
    assert choice["majority"] == "B" and choice["rewards"] == [1, 1, 0] and "label_correct" not in choice

    metrics = client.get("/metrics/").text
    assert 'mmupt_voter_groups_total{reward_mode="majority"}' in metrics
    assert "mmupt_voter_label_correct_total" in metrics


@pytest.mark.parametrize("body,message", [
    ({"responses": []}, "responses"),
    ({"responses": "\\boxed{1}"}, "responses"),
    ({"answer": "1"}, "responses"),
    ({"responses": ["x"], "extra": 1}, "extra"),
    ({"responses": ["x" * 200_001]}, "at most 200000"),
])
def test_post_vote_refuses_bad_input_with_a_message(settings, grader, body, message):
    reply = TestClient(vote_app(settings, grader)).post("/v1/vote", json=body)
    assert reply.status_code == 422 and message in reply.text


def test_post_vote_ground_truth_needs_an_answer(settings, grader):
    settings.voter.reward_mode = "ground_truth"
    client = TestClient(vote_app(settings, grader))
    reply = client.post("/v1/vote", json={"responses": ["\\boxed{1}"]})
    assert reply.status_code == 422 and "hidden answer" in reply.text
    ok = client.post("/v1/vote", json={"responses": ["\\boxed{1}", "\\boxed{2}"], "answer": 2}).json()
    assert ok["rewards"] == [0, 1] and ok["reward_mode"] == "ground_truth"


def test_mmupt_vote_command(tmp_path, capsys):
    lines = [
        {"id": 1, "responses": ["\\boxed{4}", "\\boxed{4.0}", "\\boxed{5}"], "answer": "4"},
        {"id": "mc", "responses": ["\\boxed{C}", "\\boxed{7 cm}", "nothing"], "options": ["3 cm", "5 cm", "7 cm"],
         "answer": "A"},
        {"id": "free", "responses": ["\\boxed{\\sqrt{8}}", "\\boxed{2\\sqrt{2}}"], "problem": "Simplify."},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n" + json.dumps({"id": 9}) + "\n\n")
    dst = tmp_path / "out.jsonl"
    code = mmupt_main(["vote", "--input", str(src), "--output", str(dst), "--quiet"])
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    summary = json.loads(capsys.readouterr().out)
    assert code == 1  # some lines were bad; nothing was lost
    assert [o.get("id") for o in out] == [1, "mc", "free", None, 9]
    assert out[0]["majority"] == "4" and out[0]["rewards"] == [1, 1, 0] and out[0]["label_correct"] is True
    assert out[1]["majority"] == "C" and out[1]["rewards"] == [1, 1, 0] and out[1]["label_correct"] is False
    assert out[2]["majority_ratio"] == 1.0 and "label_correct" not in out[2]
    assert out[2]["problem"] == "Simplify." and out[2]["responses"] == lines[2]["responses"]  # the input rides along
    assert out[3]["line"] == 4 and "error" in out[3] and "responses" in out[4]["error"]
    assert summary["groups"] == 3 and summary["errors"] == 2 and summary["error_lines"] == [4, 5]
    assert summary["labelled_groups"] == 2 and summary["maj_accuracy"] == 0.5
    assert summary["no_answer_rate"] == pytest.approx(1 / 8, abs=1e-4) and summary["grader"] == "mathruler"


def test_mmupt_vote_grader_option_and_missing_input(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"responses": ["\\boxed{0.5}", "\\boxed{\\frac{1}{2}}"]}) + "\n")
    dst = tmp_path / "out.jsonl"
    assert mmupt_main(["vote", "--input", str(src), "--output", str(dst), "--grader", "exact", "--quiet"]) == 0
    assert json.loads(dst.read_text())["majority_ratio"] == 0.5  # exact match: two classes
    assert mmupt_main(["vote", "--input", str(tmp_path / "nope.jsonl"), "--output", str(dst)]) == 2
    assert "input file not found" in capsys.readouterr().err
