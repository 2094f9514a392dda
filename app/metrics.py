"""Prometheus metrics. Each process keeps its own registry: the API's /metrics serves request,
generation and (read from the database at scrape time) queue, version, edit and worker figures;
a stand-alone worker serves its apply latencies on METRICS_PORT."""
from __future__ import annotations

import logging
from datetime import UTC

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy.orm import Session, sessionmaker

from . import crud
from .models import utcnow

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.edit_apply_seconds = Histogram(
            "baft_edit_apply_seconds",
            "Time from claiming edits to committing their version (training, checkpoint, commit)",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.generation_seconds = Histogram(
            "baft_generation_seconds", "Latency of a whole generation", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.generation_tokens_per_second = Histogram(
            "baft_generation_tokens_per_second",
            "Tokens per second of each generation",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=self.registry,
        )
        self.generated_tokens = Counter("baft_generated_tokens", "Tokens generated", registry=self.registry)
        self.responses = Counter(
            "baft_http_responses", "HTTP responses by status code", ["code"], registry=self.registry
        )

    def observe_generation(self, tokens: int, seconds: float) -> None:
        self.generation_seconds.observe(seconds)
        self.generated_tokens.inc(tokens)
        if seconds > 0:
            self.generation_tokens_per_second.observe(tokens / seconds)

    def watch_database(self, sessions: sessionmaker[Session]) -> None:
        """Adds the figures read from the database at each scrape (every API replica shows the
        same ones)."""
        self.registry.register(_DatabaseCollector(sessions))


class _DatabaseCollector:
    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions

    def collect(self):
        up = GaugeMetricFamily("baft_database_up", "Whether the last scrape could read the database")
        try:
            with self.sessions() as session:
                depth = crud.queue_depth(session)
                oldest = crud.oldest_pending(session)
                by_status = crud.edits_by_status(session)
                versions = crud.count_versions(session)
                chain = crud.get_chain(session)
                now = crud.db_now(session)
        except Exception as err:  # a scrape must answer even when the database is down
            log.warning("metrics: database unreadable: %s", err)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily("baft_queue_depth", "Edits queued or applying", value=depth)
        age = 0.0
        if oldest is not None:
            oldest = oldest if oldest.tzinfo else oldest.replace(tzinfo=UTC)
            age = max(0.0, (utcnow() - oldest).total_seconds())
        yield GaugeMetricFamily("baft_queue_oldest_age_seconds", "Age of the oldest waiting edit", value=age)
        edits = GaugeMetricFamily("baft_edits", "Edits by status", labels=["status"])
        for status in ("queued", "applying", "applied", "failed"):
            edits.add_metric([status], by_status.get(status, 0))
        yield edits
        yield GaugeMetricFamily("baft_versions", "Versions in the history", value=versions)
        yield GaugeMetricFamily("baft_head_version", "The current version's id", value=chain.head_version_id or 0)
        yield GaugeMetricFamily("baft_trainer_epoch", "Takeovers of the trainer lease so far", value=chain.epoch)
        held = chain.trainer is not None and chain.lease_expires > now
        yield GaugeMetricFamily("baft_worker_up", "Whether a worker holds a live trainer lease", value=int(held))
        heartbeat = now - chain.heartbeat if chain.heartbeat else float("inf")
        yield GaugeMetricFamily(
            "baft_worker_heartbeat_age_seconds", "Seconds since the trainer last renewed its lease", value=heartbeat
        )
