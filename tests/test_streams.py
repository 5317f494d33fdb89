"""The Redis contract against a real server: consumer groups, atomic append+ack, reclaim, dead letters."""
import threading
import time

import pytest

from mmupt.config import StreamSettings
from mmupt.streams import Streams


@pytest.fixture
def streams(redis_client, run_id):
    s = Streams(redis_client, run_id, StreamSettings(max_len=4, claim_idle_ms=200, block_ms=50, max_deliveries=2))
    s.ensure_groups()
    return s


def test_append_read_ack_leaves_nothing_pending(streams):
    streams.append("prompts", [b"a", b"b"])
    entries = streams.read("prompts", "c1", count=10)
    assert [e.payload for e in entries] == [b"a", b"b"]
    assert streams.pending_counts()["prompts"] == {"length": 2, "pending": 2}
    streams.append_and_ack("groups", [b"g1"], "prompts", [e.id for e in entries])
    counts = streams.pending_counts()
    assert counts["prompts"] == {"length": 0, "pending": 0}  # acked and deleted
    assert counts["groups"]["length"] == 1


def test_restarted_consumer_gets_its_own_pending_entries_first(streams, redis_client, run_id):
    streams.append("prompts", [b"a"])
    first = streams.read("prompts", "c1", count=1)
    # Same consumer name after a restart (a new Streams object): its unacked entry comes back.
    again = Streams(redis_client, run_id, streams.cfg).read("prompts", "c1", count=1)
    assert [e.id for e in again] == [e.id for e in first] and again[0].redelivered


def test_idle_entries_of_a_crashed_consumer_are_reclaimed(streams):
    streams.append("groups", [b"x"])
    taken = streams.read("groups", "crashed", count=1)
    assert taken
    assert streams.read("groups", "survivor", count=1, block_ms=10) == []  # not idle yet
    time.sleep(0.3)
    streams._last_claim.clear()
    reclaimed = streams.read("groups", "survivor", count=1)
    assert [e.id for e in reclaimed] == [taken[0].id]


def test_a_stopping_consumer_hands_its_entries_back_for_others_at_once(streams):
    streams.cfg.claim_idle_ms = 60_000
    streams.append("groups", [b"x", b"y"])
    taken = streams.read("groups", "stopping", count=2)
    assert streams.hand_back("groups", "stopping") == 2
    streams._last_claim.clear()
    reclaimed = streams.read("groups", "other", count=2)   # no 60 s wait
    assert sorted(e.id for e in reclaimed) == sorted(e.id for e in taken)
    info = streams.r.xpending_range(streams.keys.groups, "voter", min="-", max="+", count=10)
    assert {p["times_delivered"] for p in info} == {2}  # handing back is not a delivery


def test_poison_entries_go_to_the_dead_letter_stream(streams, redis_client):
    streams.append("groups", [b"poison"])
    streams.read("groups", "a", count=1)
    for consumer in ("b", "c"):  # delivered 3 times > max_deliveries=2
        time.sleep(0.25)
        streams._last_claim.clear()
        got = streams.read("groups", consumer, count=1)
    assert got == []
    dead = redis_client.xrange(streams.keys.deadletter)
    assert len(dead) == 1 and b"delivered 3 times" in dead[0][1][b"reason"]
    assert dead[0][1][b"payload"] == b"poison"
    assert streams.pending_counts()["groups"] == {"length": 0, "pending": 0}


def test_dead_letter_keeps_the_accounting(streams, redis_client):
    redis_client.hset(streams.keys.inflight, "g1", 0)
    streams.append("prompts", [b"bad"])
    entry = streams.read("prompts", "c", count=1)[0]
    streams.dead_letter("prompts", entry, "unreadable image", "rollout", group_id="g1")
    assert not redis_client.hexists(streams.keys.inflight, "g1")
    assert streams.state_int("deadlettered") == 1
    record = redis_client.xrange(streams.keys.deadletter)[0][1]
    assert record[b"reason"] == b"unreadable image" and record[b"group_id"] == b"g1"


def test_producer_waits_for_room_instead_of_trimming(streams):
    streams.append("prompts", [b"1", b"2", b"3", b"4"])  # max_len=4: full
    done = threading.Event()
    threading.Thread(target=lambda: (streams.append("prompts", [b"5"]), done.set()), daemon=True).start()
    assert not done.wait(0.3)  # back-pressure: blocked, nothing trimmed
    assert streams.r.xlen(streams.keys.prompts) == 4
    entries = streams.read("prompts", "c", count=1)
    streams.ack("prompts", [entries[0].id])
    assert done.wait(3)
    assert [e.payload for e in streams.read("prompts", "c", count=10)] == [b"2", b"3", b"4", b"5"]


def test_stopped_producer_writes_nothing(streams):
    streams.append("prompts", [b"1", b"2", b"3", b"4"])
    stop = threading.Event()
    stop.set()
    assert streams.append("prompts", [b"5"], stop) is False
    assert streams.r.xlen(streams.keys.prompts) == 4


def test_server_registry_ages_out_dead_servers(streams, redis_client):
    streams.register_server("a:1", {"grpc": "a:1", "version": 3})
    info = streams.servers(max_age_s=5)["a:1"]
    assert info["version"] == 3
    redis_client.hset(streams.keys.servers, "old:1", '{"grpc": "old:1", "heartbeat": 0}')
    assert "old:1" not in streams.servers(max_age_s=5)
