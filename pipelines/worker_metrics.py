"""Prometheus metrics of the stream worker: stage latencies, batch sizes, events by outcome.

The stages stay free of any metrics import: `instrument` wraps their entry points in this
process only (`tessera worker --metrics-port`), the way tracing agents do. A stage renamed
without updating STAGES fails loudly at start, and the worker metrics test scrapes every
stage's histogram from a running worker.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from consent.gate import ConsentGate
from consent.ledger import LineageLedger
from identity.resolver import IdentityResolver
from pipelines.pipeline import BatchReport, Pipeline
from profiles.builder import ProfileBuilder

# Stage name -> (class, method) timed as that stage. `profiles` is adding events to
# profiles; `views` is rebuilding the changed persons' purpose-scoped views.
STAGES: dict[str, tuple[type, str]] = {
    "contract": (Pipeline, "_classify"),
    "quality": (Pipeline, "_check_quality"),
    "consent": (ConsentGate, "decide"),
    "identity": (IdentityResolver, "resolve"),
    "profiles": (ProfileBuilder, "add"),
    "views": (Pipeline, "_rebuild"),
    "ledger": (LineageLedger, "append"),
}
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10_000, 50_000)


class WorkerMetrics:
    """The worker's metrics in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.stage_seconds = Histogram(
            "tessera_stage_seconds",
            "Time spent in one pipeline stage per micro-batch",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "tessera_batch_seconds",
            "Time to process and commit one micro-batch, outputs produced",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "tessera_batch_size",
            "Records per micro-batch",
            buckets=_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.events = Counter(
            "tessera_worker_events",
            "Input events by recorded outcome (duplicates of an earlier outcome excluded)",
            ["outcome"],
            registry=self.registry,
        )
        self.duplicates = Counter(
            "tessera_worker_duplicates",
            "Events skipped because they already have an outcome (replays)",
            registry=self.registry,
        )
        for stage in (*STAGES, "emit"):
            self.stage_seconds.labels(stage)  # every stage is listed from the first scrape
        for outcome in ("applied", "rejected", "withheld"):
            self.events.labels(outcome)

    def count(self, report: BatchReport) -> None:
        for outcome, n in report.outcomes.items():
            self.events.labels(outcome).inc(n)
        self.duplicates.inc(report.duplicates)


def _timed(method: Callable[..., Any], observe: Callable[[float], None]) -> Callable[..., Any]:
    @functools.wraps(method)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            observe(time.perf_counter() - started)

    timed.__tessera_instrumented__ = True  # type: ignore[attr-defined]
    return timed


def instrument(metrics: WorkerMetrics) -> None:
    """Time every stage and batch of every Pipeline in this process (idempotent)."""
    if getattr(Pipeline._process_once, "__tessera_instrumented__", False):
        return
    for stage, (cls, name) in STAGES.items():
        method = getattr(cls, name)  # AttributeError here: STAGES is out of date
        setattr(cls, name, _timed(method, metrics.stage_seconds.labels(stage).observe))
    process_once = Pipeline._process_once
    quarantine = Pipeline._quarantine
    emit_seconds = metrics.stage_seconds.labels("emit").observe

    def _process_once(
        self: Pipeline, batch: Any, emit: Callable[..., None], *rest: Any
    ) -> BatchReport:
        started = time.perf_counter()
        report = process_once(self, batch, _timed(emit, emit_seconds), *rest)
        metrics.batch_seconds.observe(time.perf_counter() - started)
        metrics.batch_size.observe(len(batch))
        metrics.count(report)
        return report

    def _quarantine(
        self: Pipeline, record: Any, error: Any, emit: Callable, *rest: Any
    ) -> BatchReport:
        report = quarantine(self, record, error, emit, *rest)
        metrics.count(report)
        return report

    _process_once.__tessera_instrumented__ = True  # type: ignore[attr-defined]
    Pipeline._process_once = _process_once  # type: ignore[method-assign]
    Pipeline._quarantine = _quarantine  # type: ignore[method-assign]


def serve_metrics(port: int, host: str = "127.0.0.1") -> WorkerMetrics:
    """Instrument the pipeline and serve /metrics on `host`:`port` from a daemon thread."""
    metrics = WorkerMetrics()
    instrument(metrics)
    start_http_server(port, addr=host, registry=metrics.registry)
    return metrics
