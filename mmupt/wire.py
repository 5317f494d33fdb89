"""Stream messages: msgpack maps with a `schema` field. Nothing executable crosses the wire.

Token ids travel as packed little-endian int32 arrays and log-probs as packed little-endian float32
arrays. Decoding validates the structure strictly; anything else raises `MalformedMessage` with a
reason, which the consumer sends to the dead-letter stream.
"""
from __future__ import annotations

from typing import Any, Literal

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PROMPT_SCHEMA = "mmupt.prompt.v1"
GROUP_SCHEMA = "mmupt.group.v1"
SCORED_SCHEMA = "mmupt.scored.v1"

# Stream entries hold one field with the msgpack payload.
PAYLOAD_FIELD = b"m"


class MalformedMessage(ValueError):
    """A stream entry that cannot be processed; `str(exc)` is the reason for the dead-letter entry."""


def pack_ids(ids) -> bytes:
    return np.asarray(ids, dtype="<i4").tobytes()


def unpack_ids(buf: bytes) -> np.ndarray:
    if len(buf) % 4:
        raise MalformedMessage("packed int32 array has a length that is not a multiple of 4")
    return np.frombuffer(buf, dtype="<i4")


def pack_floats(values) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def unpack_floats(buf: bytes) -> np.ndarray:
    if len(buf) % 4:
        raise MalformedMessage("packed float32 array has a length that is not a multiple of 4")
    return np.frombuffer(buf, dtype="<f4")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PromptMsg(Message):
    """learner -> rollout: one admitted prompt; `group_id` is unique per admission."""
    schema_: Literal[PROMPT_SCHEMA] = Field(PROMPT_SCHEMA, alias="schema")
    group_id: str
    prompt_id: str
    epoch: int = 0
    problem: str                       # with one <image> placeholder per image
    image_hashes: list[str] = []
    options: list[str] = []
    admitted_version: int = 0
    # Rides along for monitoring only (label accuracy); never read for rewards in majority mode.
    hidden_answer: str | None = None


class Response(Message):
    token_ids: bytes                   # packed <i4
    logprobs: bytes                    # packed <f4, behaviour log-probs at the sampling temperature
    text: str
    finish_reason: str

    @model_validator(mode="after")
    def _aligned(self):
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError("token_ids and logprobs differ in length")
        return self


class Sampling(Message):
    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int | None = None


class GroupMsg(Message):
    """rollout -> voter: a whole group, sampled at one policy version."""
    schema_: Literal[GROUP_SCHEMA] = Field(GROUP_SCHEMA, alias="schema")
    group_id: str
    prompt_id: str
    epoch: int = 0
    problem: str
    image_hashes: list[str] = []
    options: list[str] = []
    prompt_ids: bytes                  # packed <i4, the prompt as the rollout server tokenised it
    policy_version: int
    sampling: Sampling
    responses: list[Response]
    server_id: str = ""
    hidden_answer: str | None = None

    @model_validator(mode="after")
    def _group_complete(self):
        if not self.responses:
            raise ValueError("a group needs at least one response")
        if len(self.responses) != self.sampling.n:
            raise ValueError(f"group has {len(self.responses)} responses but sampling.n={self.sampling.n}")
        return self


class Vote(Message):
    rewards: list[float]
    answers: list[str | None]          # extracted final answer per response (None: no answer)
    pseudo_label: str | None           # the majority answer (None: no answer at all)
    majority_ratio: float              # share of responses in the winning class
    vote_entropy: float
    no_answer_rate: float
    unanimous: bool                    # every response agrees: zero advantage
    reward_mode: str                   # "majority" (label-free) or "ground_truth" (supervised baseline)
    tied: bool = False                 # the top classes had equal votes (resolved by voter.tie_policy)
    # Set when the voter's policy says not to train this group ("tie", "min_agreement"); its rewards
    # are all 0. It is still emitted so that the learner can count it (dropped_vote) and ack it.
    drop_reason: str | None = None
    compare_timeouts: int = 0          # symbolic comparisons that ran out of time (counted as not equal)
    seconds: float = 0.0               # time the vote took (latency)
    # Monitoring only, present when a hidden answer rode along.
    label_correct: bool | None = None  # the pseudo-label equals the hidden answer
    reward_accuracy: float | None = None  # share of responses whose majority reward equals the true reward
    pass_at_n: bool | None = None      # at least one response is correct


class ScoredMsg(Message):
    """voter -> learner: the group plus its vote."""
    schema_: Literal[SCORED_SCHEMA] = Field(SCORED_SCHEMA, alias="schema")
    group: GroupMsg
    vote: Vote

    @model_validator(mode="after")
    def _rewards_match(self):
        if len(self.vote.rewards) != len(self.group.responses):
            raise ValueError("one reward per response is required")
        return self


_BY_SCHEMA: dict[str, type[Message]] = {PROMPT_SCHEMA: PromptMsg, GROUP_SCHEMA: GroupMsg, SCORED_SCHEMA: ScoredMsg}


def encode(msg: Message) -> bytes:
    return msgpack.packb(msg.model_dump(by_alias=True), use_bin_type=True)


def decode(payload: bytes, expect: type[Message] | None = None, max_bytes: int | None = None) -> Any:
    """Decode and validate one payload; raises MalformedMessage with the reason. A payload over
    `max_bytes` is refused before it is unpacked (streams.max_entry_bytes)."""
    if max_bytes is not None and len(payload) > max_bytes:
        raise MalformedMessage(f"entry is {len(payload)} bytes, over the limit of {max_bytes} (streams.max_entry_bytes)")
    try:
        data = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise MalformedMessage(f"not a msgpack map: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedMessage(f"payload is a {type(data).__name__}, not a map")
    schema = data.get("schema")
    cls = _BY_SCHEMA.get(schema) if isinstance(schema, str) else None
    if cls is None:
        raise MalformedMessage(f"unknown schema {schema!r}")
    if expect is not None and cls is not expect:
        raise MalformedMessage(f"schema {schema!r} where {expect.__name__} was expected")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise MalformedMessage(f"invalid {schema}: {where}: {first['msg']}") from None
