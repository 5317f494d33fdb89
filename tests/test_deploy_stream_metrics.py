"""Stream lengths and pending counts as Prometheus metrics, read from a real server at scrape time."""
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.retry import Retry

from mmupt import stream_metrics
from mmupt.config import StreamSettings
from mmupt.embedded_redis import free_port
from mmupt.streams import Streams


def scrape(registry) -> dict[tuple[str, str], float]:
    text = generate_latest(registry).decode()
    return {(s.name, s.labels["stream"]): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_lengths_and_pending_counts_follow_the_streams(redis_client, run_id):
    streams = Streams(redis_client, run_id, StreamSettings())
    streams.ensure_groups()
    registry = CollectorRegistry()
    stream_metrics.register(streams, registry)
    assert scrape(registry)[("mmupt_stream_length", "prompts")] == 0

    streams.append("prompts", [b"a", b"b", b"c"])
    taken = streams.read("prompts", "rollout-1", count=2, block_ms=100)
    values = scrape(registry)
    assert values[("mmupt_stream_length", "prompts")] == 3
    assert values[("mmupt_stream_pending", "prompts")] == 2
    assert values[("mmupt_stream_length", "groups")] == 0

    streams.dead_letter("prompts", taken[0], "planted", "test")
    values = scrape(registry)  # read again: no caching between scrapes
    assert values[("mmupt_stream_length", "prompts")] == 2
    assert values[("mmupt_stream_pending", "prompts")] == 1
    assert values[("mmupt_stream_length", "deadletter")] == 1


def test_an_unreachable_server_does_not_fail_the_scrape(run_id):
    # Nothing listens there; no retries: this test is about the scrape, not the client's patience.
    client = redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", retry=Retry(NoBackoff(), 0))
    registry = CollectorRegistry()
    stream_metrics.register(Streams(client, run_id, StreamSettings()), registry)
    text = generate_latest(registry).decode()
    assert "# TYPE mmupt_stream_length gauge" in text and 'stream="' not in text
