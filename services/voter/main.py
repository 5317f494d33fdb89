"""The voter service: groups stream -> majority vote -> scored stream; HTTP /v1/vote."""
from __future__ import annotations

import logging
import time

from mmupt.config import Settings
from mmupt.service import Service, base_app, consumer_name
from mmupt.streams import Streams, connect
from mmupt.wire import GroupMsg, MalformedMessage, ScoredMsg, decode, encode

from . import metrics
from .grading import make_grader
from .vote import vote

log = logging.getLogger(__name__)


class Voter:
    def __init__(self, settings: Settings, streams: Streams):
        self.cfg = settings
        self.streams = streams
        self.grader = make_grader("exact")
        self.consumer = consumer_name("voter")

    def score(self, group: GroupMsg) -> ScoredMsg:
        started = time.perf_counter()
        result = vote([r.text for r in group.responses], self.grader, self.cfg.voter.reward_mode,
                      group.hidden_answer, group.options)
        metrics.LATENCY.observe(time.perf_counter() - started)
        metrics.observe(result)
        return ScoredMsg(group=group, vote=result)

    def step(self, stop) -> None:
        entries = self.streams.read("groups", self.consumer, self.cfg.voter.groups_per_read)
        for entry in entries:
            group = None
            try:
                group = decode(entry.payload or b"", GroupMsg)
                scored = self.score(group)
            except (MalformedMessage, ValueError) as exc:
                metrics.DEADLETTERED.inc()
                self.streams.dead_letter("groups", entry, str(exc), "voter", group.group_id if group else None)
                continue
            self.streams.append_and_ack("scored", [encode(scored)], "groups", [entry.id], stop)


def run(settings: Settings) -> int:
    if not settings.redis_url:
        raise SystemExit("the voter needs redis_url (config) or MMUPT_REDIS_URL")
    service = Service("voter")
    streams = Streams(connect(settings.redis_url), settings.run_id, settings.streams)
    streams.ensure_groups()
    voter = Voter(settings, streams)
    app = base_app("mmupt voter", ready=lambda: True)
    service.serve_http(app, settings.voter.host, settings.voter.http_port)
    service.loop("vote", lambda: voter.step(service.stop))
    log.info("voter %s consuming %s", voter.consumer, streams.keys.groups)
    return service.run_until_stopped()
