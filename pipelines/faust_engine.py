"""The Faust engine: a thin adapter that feeds consumed micro-batches to the Pipeline.

Faust owns consumption and the consumer group; the Pipeline owns every decision, its
state and the offsets that state reflects. Outputs are produced (and acknowledged)
before the state commits, with the next offsets in the same DuckDB transaction, so a
crash replays at most the batch in flight and event keys make the replay a no-op.

Why the worker seeks to the offsets stored in DuckDB rather than Faust's committed ones:
Faust commits what it has acknowledged on its own timer, independently of our DuckDB
commit. Its committed offset can lead the state (committed, then killed before the
batch's transaction: those events would be lost) or lag it (state committed, killed
before Faust's next commit: harmless replays). The stored offsets are exact by
construction, so on start and on every assignment each partition resumes there; Faust's
committed offsets are only a progress indicator for monitoring.

One worker owns the state: identity resolution needs every event, so the state file is
the stage's lock. A second worker started on the same data directory (shared disk) is a
standby: it waits for the lock, which the OS releases when the owner exits or dies, then
joins the group, gets every partition and resumes from the stored offsets.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import duckdb
import faust
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP, EventT

from identity.model import ScoringModel
from pipelines import topics
from pipelines.kafka import BatchProducer, faust_credentials
from pipelines.pipeline import BatchReport, Pipeline, SourceRecord

log = logging.getLogger("tessera.worker")


class StageRunner:
    """The pipeline and its producer behind one lock: a batch, an offsets read or the
    shutdown runs alone, so shutdown waits for the batch in flight to commit or roll back."""

    def __init__(self, pipeline: Pipeline, producer: BatchProducer) -> None:
        self.pipeline = pipeline
        self.producer = producer
        self._lock = threading.Lock()
        self._closed = False

    def process(self, batch: list[SourceRecord]) -> BatchReport | None:
        """Run one batch through the stages; None once closed (the batch replays on restart)."""
        with self._lock:
            if self._closed:
                return None
            return self.pipeline.process(batch, self.producer.send)

    def stored_offsets(self) -> dict[tuple[str, int], int]:
        """The next offset per (topic, partition) as of the last committed batch."""
        with self._lock:
            return {} if self._closed else self.pipeline.committed_offsets()

    def close(self) -> None:
        """Wait for the batch in flight, then release the producer and the state file."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.producer.close()
            self.pipeline.close()


class StoredOffsetConsumer(aiokafka_driver.Consumer):
    """Faust's aiokafka consumer, resuming every assigned partition at the stored offset.

    Faust calls `seek_to_committed` after each assignment (start and rebalance) and when
    flow resumes; a partition the state has never seen starts at 0 (a new or wiped state
    rebuilds from the beginning of the topic), whatever the group committed.
    """

    async def seek_to_committed(self) -> Mapping[TP, int]:
        committed = dict(await super().seek_to_committed())
        runner: StageRunner | None = getattr(self.app, "tessera_runner", None)
        if runner is None:
            return committed
        stored = await asyncio.get_running_loop().run_in_executor(None, runner.stored_offsets)
        for tp in self.assignment():
            offset = stored.get((tp.topic, tp.partition), 0)
            if committed.get(tp) != offset:
                log.info(
                    "%s/%d: group offset %s, resuming at stored %d", *tp, committed.get(tp), offset
                )
                await self.seek(tp, offset)
            committed[tp] = offset
        return committed


class StoredOffsetTransport(aiokafka_driver.Transport):
    """The aiokafka transport with the consumer above."""

    Consumer = StoredOffsetConsumer


class TesseraApp(faust.App):
    """A Faust app whose consumer resumes from the pipeline's stored offsets."""

    def _new_transport(self) -> StoredOffsetTransport:
        return StoredOffsetTransport(self.conf.broker_consumer, self)


def faust_app(
    bootstrap: str, data_dir: Path, app_id: str, batch_size: int
) -> tuple[faust.App, faust.TopicT]:
    """A Faust app configured for Tessera, and the channel over every input topic (raw bytes)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    app = TesseraApp(
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
        # Backpressure: Faust stops fetching when an agent's buffer is full, so a slow
        # state commit slows consumption instead of growing memory.
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


def open_pipeline(
    state_path: Path, identity_model: ScoringModel | None = None, poll: float = 1.0
) -> Pipeline:
    """Open the pipeline's state, waiting while another worker (the owner) holds its lock."""
    waiting = False
    while True:
        try:
            return Pipeline(state_path, identity_model=identity_model)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower():
                raise
            if not waiting:
                log.warning("standby: %s is owned by another worker; waiting for it", state_path)
                waiting = True
            time.sleep(poll)


def build_app(
    bootstrap: str,
    data_dir: Path,
    batch_size: int = 10_000,
    batch_ms: int = 200,
    app_id: str = "tessera-worker",
    identity_model: ScoringModel | None = None,
) -> faust.App:
    """A Faust app whose one agent runs the Pipeline over every input topic.

    Blocks until this process owns the state (see the module docstring).
    """
    app, inputs = faust_app(bootstrap, data_dir, app_id, batch_size)
    runner = StageRunner(
        open_pipeline(data_dir / "state.duckdb", identity_model), BatchProducer(bootstrap)
    )
    app.tessera_runner = runner  # type: ignore[attr-defined]
    app.tessera_pipeline = runner.pipeline  # type: ignore[attr-defined]

    @app.agent(inputs)
    async def run_stages(stream: faust.StreamT) -> None:
        loop = asyncio.get_running_loop()
        async for events in stream.take_events(batch_size, within=batch_ms / 1000):
            batch = source_records(events)
            # DuckDB and the producer block: keep the event loop free for heartbeats.
            # On SIGTERM this await is cancelled, but the thread finishes the batch and
            # run_worker's close() waits for it: the batch commits or rolls back whole.
            report = await loop.run_in_executor(None, runner.process, batch)
            if report is None:
                continue
            log.info(
                "batch of %d: %s, %d duplicates, %d profiles changed",
                len(batch),
                dict(report.outcomes),
                report.duplicates,
                report.profiles_changed,
            )

    return app


def run_worker(
    bootstrap: str,
    data_dir: Path,
    loglevel: str = "warn",
    identity_model: ScoringModel | None = None,
    **options: int,
) -> None:
    """Run the Faust worker until SIGINT/SIGTERM: the batch in flight commits, then exit 0."""
    app = build_app(bootstrap, data_dir, identity_model=identity_model, **options)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    try:
        worker.execute_from_commandline()
    finally:
        app.tessera_runner.close()  # type: ignore[attr-defined]
