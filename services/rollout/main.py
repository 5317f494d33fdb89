"""The rollout service: prompts stream -> a group of G samples at one policy version -> groups stream.

Also serves gRPC WeightSync (the learner pushes new versions) and the HTTP API (services/rollout/api.py:
OpenAI-style chat completions, voted rollouts, evaluation jobs, health, metrics, version).
"""
from __future__ import annotations

import hashlib
import logging
import socket
import time
from dataclasses import replace

from mmupt.auth import require_token, server_credentials
from mmupt.config import Settings
from mmupt.images import ImageError, ImageStore, decode_image
from mmupt.model import PromptError, build_messages, render_prompt
from mmupt.service import Service, consumer_name
from mmupt.streams import Streams, connect
from mmupt.wire import GroupMsg, MalformedMessage, PromptMsg, Response, Sampling, decode, encode, pack_floats, pack_ids

from . import metrics
from .api import RolloutServer, build_app
from .backend import PromptInput, PromptTooLong, SamplingParams, make_backend, prepare_prompt
from .request_queue import record_generation
from .weight_server import WeightSyncServicer, start_server

log = logging.getLogger(__name__)


def group_seed(seed: int | None, group_id: str) -> int | None:
    """A sampling seed of its own for each group (None stays unseeded)."""
    if seed is None:
        return None
    return int.from_bytes(hashlib.blake2b(f"{seed}:{group_id}".encode(), digest_size=4).digest(), "big")


class RolloutWorker:
    """Takes prompts from the `rollout` consumer group and appends whole groups."""

    def __init__(self, settings: Settings, streams: Streams, backend, server_id: str):
        self.cfg = settings
        self.streams = streams
        self.backend = backend
        self.images = ImageStore(streams.r, streams.keys, settings.streams.image_ttl_s)
        self.server_id = server_id
        self.consumer = consumer_name("rollout")
        r = settings.rollout
        self.params = SamplingParams(n=r.group_size, temperature=r.temperature, top_p=r.top_p,
                                     max_new_tokens=r.max_new_tokens, seed=r.seed)

    def too_stale(self) -> bool:
        """Cold sync: take no training prompts while more than max_staleness versions behind (in
        synchronous mode, any version behind: wait for the learner's new weights)."""
        learner_version = self.streams.state_int("version", 0)
        stale = self.backend.version + self.cfg.learner.staleness_bound < learner_version
        metrics.WAITING_FOR_WEIGHTS.set(int(stale))
        return stale

    def step(self, stop) -> None:
        if self.too_stale():
            stop.wait(0.2)
            return
        entries = self.streams.read("prompts", self.consumer, self.cfg.rollout.prompts_per_batch)
        for entry in entries:
            if stop.is_set():
                return  # unacked entries stay pending and are picked up again
            prompt = None
            try:
                prompt = decode(entry.payload or b"", PromptMsg, self.cfg.streams.max_entry_bytes)
                group = self.sample(prompt)
            except (MalformedMessage, PromptError, PromptTooLong, ImageError, KeyError) as exc:
                metrics.DEADLETTERED.inc()
                self.streams.dead_letter("prompts", entry, f"{type(exc).__name__}: {exc}", "rollout",
                                         prompt.group_id if prompt else None)
                continue
            self.streams.append_and_ack("groups", [encode(group)], "prompts", [entry.id], stop)

    def prompt_input(self, problem: str, image_hashes: list[str]) -> PromptInput:
        s = self.cfg.streams
        images = [decode_image(self.images.get(h), s.max_image_bytes, s.max_image_pixels) for h in image_hashes]
        messages = build_messages(problem, len(images), self.cfg.prompt)
        return prepare_prompt(self.backend.processor, render_prompt(self.backend.processor, messages), images,
                              self.cfg.rollout.max_prompt_tokens)

    def sample(self, prompt: PromptMsg) -> GroupMsg:
        started = time.perf_counter()
        # One seed for all groups would draw the same random numbers for every prompt (correlated groups);
        # each group gets its own, derived from rollout.seed and its id, so a run is still reproducible.
        params = replace(self.params, seed=group_seed(self.params.seed, prompt.group_id))
        result = self.backend.generate([self.prompt_input(prompt.problem, prompt.image_hashes)], params)[0]
        responses = [Response(token_ids=pack_ids(c.token_ids), logprobs=pack_floats(c.logprobs), text=c.text,
                              finish_reason=c.finish_reason) for c in result.completions]
        p = params
        seconds = time.perf_counter() - started
        metrics.GROUP_SECONDS.observe(seconds)
        metrics.GROUPS.inc()
        record_generation([result], seconds)
        return GroupMsg(
            group_id=prompt.group_id, prompt_id=prompt.prompt_id, epoch=prompt.epoch, problem=prompt.problem,
            image_hashes=prompt.image_hashes, options=prompt.options, prompt_ids=pack_ids(result.prompt_ids),
            policy_version=result.policy_version,
            sampling=Sampling(n=p.n, temperature=p.temperature, top_p=p.top_p, max_new_tokens=p.max_new_tokens,
                              seed=p.seed),
            responses=responses, server_id=self.server_id, hidden_answer=prompt.hidden_answer,
        )


def run(settings: Settings) -> int:
    if not settings.redis_url:
        raise SystemExit("the rollout server needs redis_url (config) or MMUPT_REDIS_URL")
    token = require_token(settings.auth)
    service = Service("rollout", settings.shutdown_grace_s)
    streams = Streams(connect(settings.redis_url), settings.run_id, settings.streams)
    streams.ensure_groups()
    r = settings.rollout
    metrics.initialise()
    # HTTP first: /healthz answers and /readyz says "not ready" while the weights load.
    server = RolloutServer(settings, token)
    servicer: WeightSyncServicer | None = None

    def version_info() -> dict:
        return {"checksum": servicer.serving_checksum(), "initial_checksum": servicer.initial_checksum,
                "server_id": server_id} if servicer else {}

    service.serve_http(build_app(server, version_info), r.host, r.http_port)
    backend = make_backend(settings)
    servicer = WeightSyncServicer(backend, token, settings.run_id)
    grpc_server, grpc_port = start_server(servicer, r.host, r.grpc_port, server_credentials(settings.auth))
    advertise = r.advertise_host or (socket.gethostname() if r.host == "0.0.0.0" else r.host)
    server_id = f"{advertise}:{grpc_port}"
    server.attach(backend)
    worker = RolloutWorker(settings, streams, backend, server_id)

    def heartbeat() -> None:
        streams.register_server(server_id, {"grpc": server_id, "http": f"{advertise}:{r.http_port}",
                                            "version": backend.version})
        service.stop.wait(r.heartbeat_s)

    service.loop("heartbeat", heartbeat)
    service.loop("rollout", lambda: worker.step(service.stop))
    log.info("rollout %s: weight sync on %s, consuming %s", worker.consumer, server_id, streams.keys.prompts)

    def on_stop() -> None:  # the loops have finished: hand back what they read and did not finish
        handed = streams.hand_back("prompts", worker.consumer)
        log.info("stopping: %d unfinished prompts handed back", handed)
        streams.unregister_server(server_id)
        grpc_server.stop(grace=5)
        server.close()
        backend.close()
        servicer.close()

    return service.run_until_stopped(on_stop)
