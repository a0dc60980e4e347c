"""Prometheus metrics of the API process, read from its replica store at scrape time.

Events by outcome and source, persons and identity records, store sizes, and the lag of
the worker (on its input topics) and of this replica (on the output topics). Counts come
from the store, so they are the same numbers /v1/stats serves.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from profiles.store import ProfileStore

log = logging.getLogger("tessera.metrics")

# Tables whose row counts are exported as store sizes.
STORE_TABLES = (
    "profile_documents",
    "profile_identifiers",
    "event_outcomes",
    "identity_events",
    "identity_membership",
    "quality_rejections",
)


class CachedLag:
    """A lag report computed at most every `ttl` seconds: a scrape never waits on the broker twice."""

    def __init__(self, compute: Callable[[], list[dict[str, Any]]], ttl: float = 5.0) -> None:
        self.compute = compute
        self.ttl = ttl
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._value: list[dict[str, Any]] = []
        self.last_error: str | None = None

    def get(self) -> list[dict[str, Any]]:
        with self._lock:
            if time.monotonic() - self._at >= self.ttl:
                try:
                    self._value = self.compute()
                    self.last_error = None
                except Exception as exc:  # the broker may be down; metrics must still answer
                    self.last_error = repr(exc)
                    log.warning("lag unavailable: %s", exc)
                self._at = time.monotonic()
            return list(self._value)


def store_sizes(store: ProfileStore) -> dict[str, int]:
    """Rows per exported table, and the bytes of the database file and its log."""
    cur = store.reader()
    sizes = {
        table: cur.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]
        for table in STORE_TABLES
    }
    # The file and its write-ahead log: what the replica occupies on disk right now.
    (path,) = cur.execute(
        "SELECT path FROM duckdb_databases() WHERE database_name = current_database()"
    ).fetchone()  # type: ignore[misc]
    sizes["bytes"] = sum(
        os.path.getsize(f) for f in (path, f"{path}.wal") if path and os.path.exists(f)
    )
    return sizes


class StoreCollector(Collector):
    """Collects the replica's counts and the lag report at each scrape."""

    def __init__(self, store: ProfileStore, lag: CachedLag | None = None) -> None:
        self.store = store
        self.lag = lag

    def collect(self) -> Iterator[Metric]:
        stats = self.store.stats()
        events = CounterMetricFamily(
            "tessera_events",
            "Input events by recorded outcome and source topic, as this replica has seen them",
            labels=["outcome", "source"],
        )
        for source, counts in stats["by_source_topic"].items():
            for outcome, count in counts.items():
                events.add_metric([outcome, source], count)
        yield events
        rejected = CounterMetricFamily(
            "tessera_events_rejected_by_reason",
            "Dead-lettered events by primary reason code",
            labels=["reason"],
        )
        for reason, count in stats["rejected_by_reason"].items():
            rejected.add_metric([reason or "unknown"], count)
        yield rejected
        yield GaugeMetricFamily("tessera_persons", "Unified profiles (persons)", stats["persons"])
        yield CounterMetricFamily(
            "tessera_identity_merges", "Person merges the identity stage made", stats["merges"]
        )
        sizes = store_sizes(self.store)
        yield GaugeMetricFamily(
            "tessera_identity_records",
            "Identity records (distinct identifier sets) assigned to a person",
            sizes["identity_membership"],
        )
        rows = GaugeMetricFamily(
            "tessera_store_rows", "Rows per table of the replica store", labels=["table"]
        )
        for table in STORE_TABLES:
            rows.add_metric([table], sizes[table])
        yield rows
        yield GaugeMetricFamily(
            "tessera_store_bytes", "Bytes in use by the replica store's DuckDB file", sizes["bytes"]
        )
        if self.lag is None:
            return
        lag = GaugeMetricFamily(
            "tessera_consumer_lag",
            "Messages between a reader's position and the end of a partition",
            labels=["reader", "topic", "partition"],
        )
        for row in self.lag.get():
            lag.add_metric([row["reader"], row["topic"], str(row["partition"])], row["lag"])
        yield lag


def api_registry(store: ProfileStore, lag: CachedLag | None = None) -> CollectorRegistry:
    """A registry of its own per app (two apps in one process do not share metrics)."""
    registry = CollectorRegistry()
    registry.register(StoreCollector(store, lag))
    return registry
