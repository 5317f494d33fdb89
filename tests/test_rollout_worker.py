"""The training path of the rollout server: prompts stream -> whole groups, over a real server;
a prompt that cannot be served (too long, image missing) goes to the dead-letter stream with why."""
from __future__ import annotations

import threading

from mmupt.images import ImageStore
from mmupt.services.rollout.hf_backend import TransformersBackend
from mmupt.services.rollout.main import RolloutWorker
from mmupt.streams import Streams, connect
from mmupt.wire import GroupMsg, PromptMsg, decode, encode, unpack_floats, unpack_ids
from rollout_support import png_bytes


def test_prompts_become_groups_and_unservable_ones_are_dead_lettered(settings):
    settings.rollout.max_prompt_tokens = 120
    settings.rollout.prompts_per_batch = 3
    streams = Streams(connect(settings.redis_url), settings.run_id, settings.streams)
    streams.ensure_groups()
    images = ImageStore(streams.r, streams.keys, settings.streams.image_ttl_s)
    digest = images.put(png_bytes())
    prompts = [PromptMsg(group_id="g-ok", prompt_id="p1", problem="<image> Which shape?", image_hashes=[digest]),
               PromptMsg(group_id="g-long", prompt_id="p2", problem="<image> " + "many words " * 200,
                         image_hashes=[digest]),
               PromptMsg(group_id="g-gone", prompt_id="p3", problem="<image> Which?", image_hashes=["0" * 64])]
    streams.append("prompts", [encode(p) for p in prompts])
    worker = RolloutWorker(settings, streams, TransformersBackend(settings.model), "test-server")
    worker.step(threading.Event())

    (entry,) = streams.r.xrange(streams.keys.groups)
    group = decode(entry[1][b"m"], GroupMsg)
    assert group.group_id == "g-ok" and len(group.responses) == settings.rollout.group_size
    assert all(len(unpack_ids(r.token_ids)) == len(unpack_floats(r.logprobs)) for r in group.responses)
    dead = {fields[b"group_id"]: fields[b"reason"].decode() for _, fields in streams.r.xrange(streams.keys.deadletter)}
    assert "PromptTooLong" in dead[b"g-long"] and "over the limit of 120" in dead[b"g-long"]
    assert "not in the store" in dead[b"g-gone"]
    assert streams.pending_counts()["prompts"] == {"length": 0, "pending": 0}


def test_a_seeded_run_gives_each_group_its_own_sampling_seed():
    from mmupt.services.rollout.main import group_seed

    seeds = {group_seed(0, f"0:{i}") for i in range(100)}
    assert len(seeds) == 100                      # no two groups draw the same random numbers
    assert group_seed(0, "0:1") == group_seed(0, "0:1") != group_seed(1, "0:1")   # reproducible per run seed
    assert group_seed(None, "0:1") is None        # unseeded stays unseeded
