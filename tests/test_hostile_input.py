"""Hostile stream entries: truncated, oversized, malformed, and prompts whose images are bombs,
non-images or gone. Each goes to the dead-letter stream with its reason, the account stays exact,
and the good entry beside them is processed. (HTTP-side hostile input: tests/test_api.py,
tests/test_fuzz_http.py; symbolic blow-ups: tests/test_grading.py.)"""
from __future__ import annotations

import threading

import pytest

from mmupt.images import ImageStore
from mmupt.streams import Streams, connect
from mmupt.wire import PAYLOAD_FIELD, PromptMsg, ScoredMsg, decode, encode
from rollout_support import png_bytes
from test_vote_service import MAJORITY, group_for


@pytest.fixture
def streams(settings):
    s = Streams(connect(settings.redis_url), settings.run_id, settings.streams)
    s.ensure_groups()
    return s


def dead_letters(streams) -> dict[str, dict]:
    """group_id (or entry id when unparseable) -> the dead-letter record."""
    out = {}
    for _id, fields in streams.r.xrange(streams.keys.deadletter):
        record = {k.decode(): v for k, v in fields.items()}
        key = record["group_id"].decode() or record["entry_id"].decode()
        out[key] = {k: (v.decode(errors="replace") if k != "payload" else v) for k, v in record.items()}
    return out


def test_truncated_oversized_and_malformed_groups_are_dead_lettered_with_reasons(settings, streams):
    from mmupt.services.voter.grading import make_grader
    from mmupt.services.voter.main import Voter

    settings.streams.max_entry_bytes = 64 * 1024
    good = encode(group_for(PromptMsg(group_id="0:0", prompt_id="p", problem="<image>How many?"), MAJORITY))
    huge = encode(group_for(PromptMsg(group_id="0:1", prompt_id="p", problem="x" * 100_000), MAJORITY))
    ids = {}
    for name, payload in {"good": good, "truncated": good[: len(good) // 2], "oversized": huge,
                          "not_msgpack": b"\xc1\xc1\xc1", "wrong_schema": encode(PromptMsg(
                              group_id="0:2", prompt_id="p", problem="?"))}.items():
        ids[streams.r.xadd(streams.keys.groups, {PAYLOAD_FIELD: payload})] = name
    grader = make_grader("exact")
    Voter(settings, streams, grader=grader).step(threading.Event())

    reasons = {ids[rec["entry_id"].encode()]: rec for rec in dead_letters(streams).values()}
    assert sorted(reasons) == ["not_msgpack", "oversized", "truncated", "wrong_schema"]
    assert "over the limit of 65536" in reasons["oversized"]["reason"]
    assert "not a msgpack map" in reasons["truncated"]["reason"]
    assert "where GroupMsg was expected" in reasons["wrong_schema"]["reason"]
    assert all(rec["service"] == "voter" and rec["stream"] == "groups" for rec in reasons.values())
    assert len(reasons["oversized"]["payload"]) <= 1024 * 1024  # the raw bytes are kept, bounded
    [(_, fields)] = streams.r.xrange(streams.keys.scored)
    assert decode(fields[PAYLOAD_FIELD], ScoredMsg).group.group_id == "0:0"
    assert streams.pending_counts()["groups"] == {"length": 0, "pending": 0}


def test_prompts_with_bomb_non_image_or_missing_images_are_dead_lettered_and_counted(settings, streams):
    from mmupt.services.rollout.hf_backend import TransformersBackend
    from mmupt.services.rollout.main import RolloutWorker

    settings.streams.max_image_pixels = 1_000_000
    images = ImageStore(streams.r, streams.keys, 60)
    cases = {
        "0:0": png_bytes(),                                      # good
        "0:1": png_bytes((3000, 3000), 0, mode="1"),            # 9 Mpx decoded from a few KB: refused from the header
        "0:2": b"GIF89a but not really an image",
        "0:3": None,                                             # expired from the image store
    }
    for group_id, data in cases.items():
        digest = images.put(data) if data is not None else "0" * 64
        prompt = PromptMsg(group_id=group_id, prompt_id=group_id, problem="<image>How many shapes?",
                           image_hashes=[digest])
        streams.r.xadd(streams.keys.prompts, {PAYLOAD_FIELD: encode(prompt)})
        streams.r.hset(streams.keys.inflight, group_id, 0)
        streams.r.hincrby(streams.keys.state, "admitted", 1)
    worker = RolloutWorker(settings, streams, TransformersBackend(settings.model), "hostile")
    worker.step(threading.Event())
    for _ in range(3):
        worker.step(threading.Event())

    dead = dead_letters(streams)
    assert sorted(dead) == ["0:1", "0:2", "0:3"]
    assert "pixels" in dead["0:1"]["reason"]
    assert "not a readable image" in dead["0:2"]["reason"]
    assert "not in the store" in dead["0:3"]["reason"]
    # Each dead-lettered group left the in-flight set and was counted: the account stays exact.
    assert streams.state_int("deadlettered") == 3
    assert sorted(k.decode() for k in streams.r.hkeys(streams.keys.inflight)) == ["0:0"]
    assert streams.r.xlen(streams.keys.groups) == 1
