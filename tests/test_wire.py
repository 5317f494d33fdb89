import msgpack
import numpy as np
import pytest

from mmupt.wire import (GroupMsg, MalformedMessage, PromptMsg, Response, Sampling, ScoredMsg, Vote, decode, encode,
                        pack_floats, pack_ids, unpack_floats, unpack_ids)


def group(n=2):
    return GroupMsg(group_id="0:1", prompt_id="p", problem="<image>How many?", image_hashes=["ab"],
                    prompt_ids=pack_ids([1, 2, 3]), policy_version=3,
                    sampling=Sampling(n=n, temperature=1.0, top_p=1.0, max_new_tokens=8),
                    responses=[Response(token_ids=pack_ids([5, 6]), logprobs=pack_floats([-0.5, -1.0]), text="x",
                                        finish_reason="stop") for _ in range(n)])


def test_packed_arrays_are_little_endian():
    assert pack_ids([1, 256]) == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    assert unpack_ids(pack_ids([7, -1])).tolist() == [7, -1]
    np.testing.assert_allclose(unpack_floats(pack_floats([0.25, -3.5])), [0.25, -3.5])


def test_roundtrip_all_schemas():
    prompt = PromptMsg(group_id="g", prompt_id="p", problem="q", hidden_answer="3")
    assert decode(encode(prompt)) == prompt
    g = group()
    assert decode(encode(g), GroupMsg) == g
    vote = Vote(rewards=[1.0, 0.0], answers=["3", None], pseudo_label="3", majority_ratio=0.5, vote_entropy=0.0,
                no_answer_rate=0.5, unanimous=False, reward_mode="majority")
    scored = ScoredMsg(group=g, vote=vote)
    assert decode(encode(scored), ScoredMsg) == scored


@pytest.mark.parametrize("payload,reason", [
    (b"\xc1garbage", "not a msgpack map"),
    (msgpack.packb([1, 2]), "not a map"),
    (msgpack.packb({"schema": "evil.v9"}), "unknown schema"),
    (msgpack.packb({"schema": "mmupt.prompt.v1", "group_id": "g"}), "invalid mmupt.prompt.v1"),
    (msgpack.packb({"schema": "mmupt.prompt.v1", "group_id": "g", "prompt_id": "p", "problem": "q", "x": 1}),
     "Extra inputs"),
])
def test_malformed_payloads_have_reasons(payload, reason):
    with pytest.raises(MalformedMessage, match=reason):
        decode(payload)


def test_wrong_schema_for_the_stream():
    with pytest.raises(MalformedMessage, match="where GroupMsg was expected"):
        decode(encode(PromptMsg(group_id="g", prompt_id="p", problem="q")), GroupMsg)


def test_group_must_be_complete():
    data = group().model_dump(by_alias=True)
    data["responses"] = data["responses"][:1]
    with pytest.raises(MalformedMessage, match="sampling.n=2"):
        decode(msgpack.packb(data, use_bin_type=True))


def test_misaligned_logprobs_are_refused():
    data = group().model_dump(by_alias=True)
    data["responses"][0]["logprobs"] = pack_floats([0.0])
    with pytest.raises(MalformedMessage, match="differ in length"):
        decode(msgpack.packb(data, use_bin_type=True))
