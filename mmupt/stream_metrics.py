"""Redis stream lengths and pending counts as Prometheus metrics, read from Redis at scrape time.

Processed entries are deleted (see streams.py), so a stream's length is its unfinished work and the
dead-letter stream's length is what could not be processed. The collector asks Redis on every
scrape rather than caching, so the figures are never older than the scrape itself.
"""
from __future__ import annotations

import logging

import redis
from prometheus_client.core import REGISTRY, CollectorRegistry, GaugeMetricFamily
from prometheus_client.registry import Collector

from .streams import Streams

log = logging.getLogger(__name__)

LENGTH = "mmupt_stream_length"
PENDING = "mmupt_stream_pending"


class StreamMetrics(Collector):
    """`mmupt_stream_length{stream}` and `mmupt_stream_pending{stream}` for every stream of one run."""

    def __init__(self, streams: Streams):
        self.streams = streams

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (GaugeMetricFamily(LENGTH, "Entries in a stream: unfinished work (dead letters for deadletter)",
                                  labels=["stream"]),
                GaugeMetricFamily(PENDING, "Entries delivered to a consumer and not yet acked", labels=["stream"]))

    def describe(self):
        # Declaring the names lets the registry check for clashes without a Redis round trip.
        return list(self._families())

    def collect(self):
        length, pending = self._families()
        try:
            counts = self.streams.pending_counts()
        except redis.RedisError as exc:  # a scrape must not fail the service; the gap shows on the dashboard
            log.warning("stream metrics unavailable: %s", exc)
            counts = {}
        for name, count in counts.items():
            length.add_metric([name], count["length"])
            pending.add_metric([name], count["pending"])
        return [length, pending]


def register(streams: Streams, registry: CollectorRegistry = REGISTRY) -> StreamMetrics:
    """Export the run's stream metrics on `registry` (the default one is what /metrics serves)."""
    collector = StreamMetrics(streams)
    registry.register(collector)
    return collector
