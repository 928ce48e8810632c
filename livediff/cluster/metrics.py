"""One Prometheus scrape for the whole cluster: every replica's metrics with a `replica` label,
plus what the entry point knows of each replica (sessions, free room, readiness)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from livediff.cluster.routing import ReplicaView

CONTENT_TYPE = CONTENT_TYPE_LATEST
LABEL = "replica"


class _Merged(Collector):
    def __init__(self, texts: dict[str, str], replicas: Sequence[ReplicaView]) -> None:
        self.texts = texts
        self.replicas = replicas

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for key, text in sorted(self.texts.items()):
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                merged.samples.extend(Sample(s.name, {**s.labels, LABEL: key}, s.value, s.timestamp, s.exemplar)
                                      for s in family.samples)  # fmt: skip
        yield from families.values()
        sessions = GaugeMetricFamily(
            "livediff_replica_sessions",
            "Sessions per replica, as the entry point places by (with sessions being opened)",
            labels=[LABEL],
        )
        free = GaugeMetricFamily(
            "livediff_replica_free_slots", "max_sessions less sessions, per replica", labels=[LABEL]
        )
        ready = GaugeMetricFamily("livediff_replica_ready", "1 when the replica's engine is warm", labels=[LABEL])
        for replica in self.replicas:
            sessions.add_metric([replica.key], replica.sessions)
            free.add_metric([replica.key], replica.free)
            ready.add_metric([replica.key], float(replica.ready))
        yield from (sessions, free, ready)
        yield GaugeMetricFamily("livediff_replicas", "Replicas the entry point routes to", value=len(self.replicas))


def merge(texts: dict[str, str], replicas: Sequence[ReplicaView]) -> bytes:
    """Prometheus text of `texts` (replica key -> its /metrics) with a `replica` label on every
    sample, and the per-replica gauges of `replicas`."""
    registry = CollectorRegistry()
    registry.register(_Merged(texts, replicas))
    return generate_latest(registry)
