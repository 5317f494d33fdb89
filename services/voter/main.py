"""The voter service: groups stream -> majority vote -> scored stream; HTTP POST /v1/vote.

Every group is emitted to the scored stream, also those the vote policy drops (tie / minimum
agreement): they carry `vote.drop_reason`, and the learner counts and acks them without training.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from fastapi import HTTPException
from fastapi.concurrency import run_in_threadpool

from mmupt.config import Settings, VoterSettings
from mmupt.service import Service, base_app, consumer_name
from mmupt.streams import Streams, connect
from mmupt.wire import GroupMsg, MalformedMessage, ScoredMsg, decode, encode

from . import metrics
from .grading import Grader, make_grader
from .records import VoteRequest, record, vote_file, vote_request
from .vote import VotePolicy, vote

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 30.0


def grader_for(voter: VoterSettings) -> Grader:
    return make_grader(voter.grader, voter.compare_timeout_s)


class Progress:
    """A log line every PROGRESS_EVERY_S: groups voted, rate, label accuracy, timeouts."""

    def __init__(self):
        self.started = self.last = time.monotonic()
        self.groups = self.labelled = self.correct = self.timeouts = self.dropped = 0

    def add(self, result) -> None:
        self.groups += 1
        self.timeouts += result.compare_timeouts
        self.dropped += result.drop_reason is not None
        if result.label_correct is not None:
            self.labelled += 1
            self.correct += result.label_correct
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            accuracy = f"{self.correct / self.labelled:.3f}" if self.labelled else "n/a"
            log.info("voted %d groups (%.1f groups/s), label accuracy %s, dropped %d, compare timeouts %d",
                     self.groups, self.groups / (now - self.started), accuracy, self.dropped, self.timeouts)


class Voter:
    def __init__(self, settings: Settings, streams: Streams, grader: Grader | None = None):
        self.cfg = settings
        self.streams = streams
        self.grader = grader or grader_for(settings.voter)
        self.policy = VotePolicy.from_settings(settings.voter)
        self.consumer = consumer_name("voter")
        self.progress = Progress()

    def score(self, group: GroupMsg) -> ScoredMsg:
        result = vote([r.text for r in group.responses], self.grader, self.cfg.voter.reward_mode,
                      group.hidden_answer, group.options, policy=self.policy, key=group.group_id)
        metrics.observe(result)
        self.progress.add(result)
        return ScoredMsg(group=group, vote=result)

    def step(self, stop) -> None:
        entries = self.streams.read("groups", self.consumer, self.cfg.voter.groups_per_read)
        for entry in entries:
            group = None
            try:
                group = decode(entry.payload or b"", GroupMsg, self.cfg.streams.max_entry_bytes)
                scored = self.score(group)
            except (MalformedMessage, ValueError) as exc:
                metrics.DEADLETTERED.inc()
                self.streams.dead_letter("groups", entry, str(exc), "voter", group.group_id if group else None)
                continue
            self.streams.append_and_ack("scored", [encode(scored)], "groups", [entry.id], stop)


def vote_app(settings: Settings, grader: Grader):
    """HTTP: health, metrics and `POST /v1/vote` (same semantics as `mmupt vote`, one group a request).

    The HTTP grader is not the stream loop's: requests never hold up training groups' comparisons.
    """
    app = base_app("mmupt voter", ready=lambda: True, max_request_bytes=settings.voter.max_request_bytes)
    policy, mode = VotePolicy.from_settings(settings.voter), settings.voter.reward_mode

    @app.post("/v1/vote")
    async def post_vote(request: VoteRequest):
        try:
            result = await run_in_threadpool(vote_request, request, grader, policy, mode)
        except ValueError as exc:  # e.g. ground_truth mode without an answer
            raise HTTPException(status_code=422, detail=str(exc)) from None
        metrics.observe(result)
        return record(request, result)

    return app


def vote_file_command(settings: Settings, input_path: str, output_path: str, progress: bool = True) -> dict:
    """`mmupt vote`: vote a JSONL file offline with the voter section of `settings`; returns the summary."""
    if not Path(input_path).is_file():
        raise FileNotFoundError(f"input file not found: {input_path}")
    grader = grader_for(settings.voter)
    grader.start(wait=True)  # else the first groups' comparisons would wait for sympy to import
    try:
        summary = vote_file(input_path, output_path, grader, VotePolicy.from_settings(settings.voter),
                            settings.voter.reward_mode, progress=progress)
    finally:
        grader.close()
    return summary.as_dict() | {"grader": grader.name, "reward_mode": settings.voter.reward_mode,
                                "output": str(output_path)}


def run(settings: Settings) -> int:
    if not settings.redis_url:
        raise SystemExit("the voter needs redis_url (config) or MMUPT_REDIS_URL")
    vc = settings.voter
    service = Service("voter", settings.shutdown_grace_s)
    streams = Streams(connect(settings.redis_url), settings.run_id, settings.streams)
    streams.ensure_groups()
    voter = Voter(settings, streams)
    http_grader = grader_for(vc)
    for grader in (voter.grader, http_grader):
        grader.start(wait=True)  # the symbolic workers import sympy now, not within the first group's budget
    metrics.INFO.labels(vc.reward_mode, vc.grader, vc.tie_policy).set(1)
    metrics.initialise(vc.reward_mode)
    service.serve_http(vote_app(settings, http_grader), vc.host, vc.http_port)
    service.loop("vote", lambda: voter.step(service.stop))
    log.info("voter %s consuming %s (grader %s, reward mode %s, tie policy %s, min agreement %.2f)",
             voter.consumer, streams.keys.groups, vc.grader, vc.reward_mode, vc.tie_policy, vc.min_agreement)

    def close():  # the loop has finished: hand back what it read and did not finish
        log.info("stopping: %d unfinished groups handed back", streams.hand_back("groups", voter.consumer))
        voter.grader.close()
        http_grader.close()

    return service.run_until_stopped(close)
