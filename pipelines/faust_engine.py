"""The Faust engine: a thin adapter that feeds consumed micro-batches to the Pipeline.

Faust owns consumption, the consumer group and offset commits; the Pipeline owns every
decision and its state. Outputs are produced (and acknowledged) before the state commits,
and the batch is acknowledged to Faust only after that, so a crash replays the batch and
event keys make the replay a no-op.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import faust
from faust.types import EventT

from identity.model import ScoringModel
from pipelines import topics
from pipelines.kafka import BatchProducer, faust_credentials
from pipelines.pipeline import Pipeline, SourceRecord

log = logging.getLogger("tessera.worker")


def faust_app(
    bootstrap: str, data_dir: Path, app_id: str, batch_size: int
) -> tuple[faust.App, faust.TopicT]:
    """A Faust app configured for Tessera, and the channel over every input topic (raw bytes)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        app_id,
        broker=f"kafka://{bootstrap}",
        broker_credentials=faust_credentials(),
        datadir=str(data_dir / "faust"),
        store="memory://",
        web_enabled=False,
        autodiscover=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=6,
        broker_heartbeat_interval=1,
        broker_commit_every=batch_size,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=max(4 * batch_size, 4096),
    )
    inputs = app.topic(*topics.WORKER_TOPICS, value_serializer="raw", key_serializer="raw")
    return app, inputs


def source_records(events: list[EventT]) -> list[SourceRecord]:
    """Faust events as the Pipeline's engine-neutral records."""
    return [
        SourceRecord(
            e.message.topic, e.message.partition, e.message.offset, e.message.value, e.message.key
        )
        for e in events
    ]


def build_app(
    bootstrap: str,
    data_dir: Path,
    batch_size: int = 2000,
    batch_ms: int = 200,
    app_id: str = "tessera-worker",
    identity_model: ScoringModel | None = None,
) -> faust.App:
    """A Faust app whose one agent runs the Pipeline over every input topic."""
    app, inputs = faust_app(bootstrap, data_dir, app_id, batch_size)
    pipeline = Pipeline(data_dir / "state.duckdb", identity_model=identity_model)
    producer = BatchProducer(bootstrap)
    app.tessera_pipeline = pipeline  # type: ignore[attr-defined]

    @app.agent(inputs)
    async def run_stages(stream: faust.StreamT) -> None:
        loop = asyncio.get_running_loop()
        async for events in stream.take_events(batch_size, within=batch_ms / 1000):
            batch = source_records(events)
            # DuckDB and the producer block: keep the event loop free for heartbeats.
            report = await loop.run_in_executor(None, pipeline.process, batch, producer.send)
            log.info(
                "batch of %d: %s, %d duplicates, %d profiles changed",
                len(batch),
                dict(report.outcomes),
                report.duplicates,
                report.profiles_changed,
            )

    app.tessera_producer = producer  # type: ignore[attr-defined]
    return app


def run_worker(
    bootstrap: str,
    data_dir: Path,
    loglevel: str = "warn",
    identity_model: ScoringModel | None = None,
    **options: int,
) -> None:
    """Run the Faust worker until SIGINT/SIGTERM (Faust handles both gracefully)."""
    app = build_app(bootstrap, data_dir, identity_model=identity_model, **options)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    try:
        worker.execute_from_commandline()
    finally:
        app.tessera_producer.close()  # type: ignore[attr-defined]
        app.tessera_pipeline.close()  # type: ignore[attr-defined]
