"""The JSON form of a vote: `mmupt vote` lines and `POST /v1/vote` share it.

Input: `{"id": ..., "responses": [str, ...], "answer": optional, "options": optional}`.
Output (`mmupt vote`: added to the input line; `POST /v1/vote`: on their own): `id`, `majority`
(string or null), `rewards`, `majority_ratio`, `answers`, `vote_entropy`, `no_answer_rate`,
`unanimous`, `tied`, `dropped` and `drop_reason`, `compare_timeouts`, `reward_mode`, `seconds`, and
with an `answer`: `label_correct`, `reward_accuracy`, `pass_at_n`.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mmupt.wire import Vote

from .grading import Grader
from .vote import VotePolicy, vote

log = logging.getLogger(__name__)

# Bounds on one request: a vote is over one group of sampled responses, not a bulk upload.
MAX_RESPONSES = 1024
MAX_RESPONSE_CHARS = 200_000
MAX_OPTIONS = 26


class VoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | int | None = None
    responses: list[str] = Field(min_length=1, max_length=MAX_RESPONSES)
    answer: str | None = None
    options: list[str] | None = Field(None, max_length=MAX_OPTIONS)

    @field_validator("responses")
    @classmethod
    def _bounded(cls, responses: list[str]) -> list[str]:
        for i, text in enumerate(responses):
            if len(text) > MAX_RESPONSE_CHARS:
                raise ValueError(f"responses[{i}] has {len(text)} characters (at most {MAX_RESPONSE_CHARS})")
        return responses

    @field_validator("answer", mode="before")
    @classmethod
    def _answer_as_text(cls, answer):
        return str(answer) if isinstance(answer, (int, float)) and not isinstance(answer, bool) else answer


def vote_request(request: VoteRequest, grader: Grader, policy: VotePolicy, mode: str) -> Vote:
    return vote(request.responses, grader, mode, hidden_answer=request.answer, options=request.options,
                policy=policy, key=str(request.id) if request.id is not None else "")


def record(request: VoteRequest, result: Vote) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": request.id, "majority": result.pseudo_label, "rewards": result.rewards,
        "majority_ratio": result.majority_ratio, "answers": result.answers, "vote_entropy": result.vote_entropy,
        "no_answer_rate": result.no_answer_rate, "unanimous": result.unanimous, "tied": result.tied,
        "dropped": result.drop_reason is not None, "drop_reason": result.drop_reason,
        "compare_timeouts": result.compare_timeouts, "reward_mode": result.reward_mode,
        "seconds": round(result.seconds, 6),
    }
    if request.answer is not None:
        out |= {"label_correct": result.label_correct, "reward_accuracy": result.reward_accuracy,
                "pass_at_n": result.pass_at_n}
    return out


def describe_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<line>"
        return f"{where}: {first['msg']}"
    return str(exc)


@dataclass
class Summary:
    """What `mmupt vote` prints at the end."""
    groups: int = 0
    errors: int = 0
    responses: int = 0
    no_answers: int = 0
    dropped: int = 0
    compare_timeouts: int = 0
    labelled: int = 0
    label_correct: int = 0
    seconds: float = 0.0
    error_lines: list[int] = field(default_factory=list)

    def add(self, result: Vote) -> None:
        self.groups += 1
        self.responses += len(result.answers)
        self.no_answers += sum(a is None for a in result.answers)
        self.dropped += result.drop_reason is not None
        self.compare_timeouts += result.compare_timeouts
        if result.label_correct is not None:
            self.labelled += 1
            self.label_correct += result.label_correct

    def as_dict(self) -> dict[str, Any]:
        return {
            "groups": self.groups, "errors": self.errors, "error_lines": self.error_lines[:20],
            "responses": self.responses,
            "no_answer_rate": round(self.no_answers / self.responses, 4) if self.responses else None,
            "dropped": self.dropped, "compare_timeouts": self.compare_timeouts,
            "labelled_groups": self.labelled,
            "maj_accuracy": round(self.label_correct / self.labelled, 4) if self.labelled else None,
            "seconds": round(self.seconds, 2),
            "responses_per_s": round(self.responses / self.seconds, 1) if self.seconds else None,
        }


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def vote_file(input_path: str | Path, output_path: str | Path, grader: Grader, policy: VotePolicy,
              mode: str = "majority", progress: bool = True) -> Summary:
    """Vote every line of a JSONL file into another: each output line is its input line plus the
    vote's fields. A bad line loses nothing: its output line holds `id` (when readable), `line` and
    `error`, and it is counted in the summary."""
    from tqdm import tqdm

    input_path, output_path = Path(input_path), Path(output_path)
    summary = Summary()
    started = time.perf_counter()
    total = _count_lines(input_path) if progress else None
    with input_path.open(encoding="utf-8") as src, output_path.open("w", encoding="utf-8") as dst, \
            tqdm(total=total, unit="group", disable=not progress, desc="vote") as bar:
        for number, line in enumerate(src, start=1):
            if not line.strip():
                continue
            raw: Any = None
            try:
                raw = json.loads(line)
                if not isinstance(raw, dict):
                    raise ValueError(f"a line must hold a JSON object, not {type(raw).__name__}")
                # Other fields (problem, images, ...) ride along untouched into the output line.
                request = VoteRequest.model_validate({k: v for k, v in raw.items() if k in VoteRequest.model_fields})
                result = vote_request(request, grader, policy, mode)
                out = raw | record(request, result)
                summary.add(result)
            except (ValueError, ValidationError) as exc:  # JSONDecodeError is a ValueError
                summary.errors += 1
                summary.error_lines.append(number)
                out = {"id": raw.get("id") if isinstance(raw, dict) else None, "line": number,
                       "error": describe_error(exc)}
                log.warning("line %d: %s", number, out["error"])
            dst.write(json.dumps(out, ensure_ascii=False) + "\n")
            bar.update(1)
    summary.seconds = time.perf_counter() - started
    return summary
