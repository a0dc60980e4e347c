"""The Faust engine: a thin adapter that feeds consumed micro-batches to the Pipeline.

Faust owns consumption and the consumer group; the Pipeline owns every decision, its
state and the offsets that state reflects. Outputs are produced (and acknowledged)
before the state commits, with the next offsets in the same DuckDB transaction, so a
crash replays at most the batch in flight, cut exactly as it was (pipelines/replay.py),
and event keys make the replay a no-op.

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

Many workers: `--role ingest` workers share the input partitions and forward them to one
`--role stages` owner (pipelines/ingest.py); the owner runs this module's agent over the
bundles of `tessera.stages.input` instead of the input topics.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import duckdb
import faust
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP, EventT

from consent.keys import configured_key_store
from identity.model import ScoringModel
from pipelines import topics
from pipelines.bundles import decode_bundle
from pipelines.kafka import BatchProducer, DeliveryError, faust_credentials
from pipelines.pipeline import BatchReport, Pipeline, SourceRecord
from pipelines.replay import ReplayCut, Unit

log = logging.getLogger("tessera.worker")


class StageRunner:
    """The pipeline and its producer behind one lock: a batch, an offsets read or the
    shutdown runs alone, so shutdown waits for the batch in flight to commit or roll back."""

    def __init__(
        self, pipeline: Pipeline, producer: BatchProducer, retry_pause: float = 1.0
    ) -> None:
        self.pipeline = pipeline
        self.producer = producer
        self.retry_pause = retry_pause
        # After a crash between a batch's outputs and its commit: replay it as it was cut.
        self.replay = ReplayCut(pipeline.interrupted_extent())
        self._lock = threading.Lock()
        self._closed = False

    def process(
        self, batch: list[SourceRecord], consumed: Sequence[SourceRecord] = ()
    ) -> BatchReport | None:
        """Run one batch through the stages; None once closed (the batch replays on restart).

        `consumed`: the bundle positions the batch was read from, when it was forwarded.
        A batch whose outputs the broker did not acknowledge (it is away) rolled back whole;
        it runs again every `retry_pause` seconds until it commits or the runner closes.
        Letting the error escape would lose it: Faust restarts a crashed agent on the
        events after the batch, and the next commit would store offsets past it.
        """
        while True:
            with self._lock:
                if self._closed:
                    return None
                try:
                    return self.pipeline.process(batch, self.producer.send, consumed)
                except DeliveryError as exc:
                    log.warning(
                        "batch of %d rolled back, outputs not acknowledged (%s); retrying",
                        len(batch),
                        exc,
                    )
            time.sleep(self.retry_pause)  # outside the lock: a shutdown may close meanwhile

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
    bootstrap: str,
    data_dir: Path,
    app_id: str,
    batch_size: int,
    app_class: type[faust.App] = TesseraApp,
    input_topics: Sequence[str] = topics.WORKER_TOPICS,
    buffered: int | None = None,
) -> tuple[faust.App, faust.TopicT]:
    """A Faust app configured for Tessera, and the channel over `input_topics` (raw bytes)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    app = app_class(
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
        # `buffered` counts messages: bundles for the stage owner, each up to a batch.
        stream_buffer_maxsize=buffered or max(4 * batch_size, 4096),
    )
    inputs = app.topic(*input_topics, value_serializer="raw", key_serializer="raw")
    return app, inputs


def source_records(events: list[EventT]) -> list[SourceRecord]:
    """Faust events as the Pipeline's engine-neutral records."""
    return [
        SourceRecord(
            e.message.topic, e.message.partition, e.message.offset, e.message.value, e.message.key
        )
        for e in events
    ]


def consumed_units(events: list[EventT], bundled: bool) -> list[Unit]:
    """What was consumed, position by position: each record itself, or a bundle and the
    records it carries."""
    if not bundled:
        return [Unit(r, (r,)) for r in source_records(events)]
    return [
        Unit(
            SourceRecord(e.message.topic, e.message.partition, e.message.offset, None),
            decode_bundle(e.message.value),
        )
        for e in events
    ]


def bundled_batches(
    units: Sequence[Unit], batch_size: int
) -> list[tuple[list[SourceRecord], list[SourceRecord]]]:
    """Bundles from ingest workers as batches of whole bundles of about `batch_size`
    records each: (records, the bundles' own positions) per batch, in bundle order.

    Ingest workers cut a bundle per micro-batch of their own, small when their share is
    small; regrouping keeps the owner's per-batch costs amortised over `batch_size`.
    """
    batches: list[tuple[list[SourceRecord], list[SourceRecord]]] = []
    records: list[SourceRecord] = []
    positions: list[SourceRecord] = []
    for unit in units:
        records += unit.records
        positions.append(unit.position)
        if len(records) >= batch_size:
            batches.append((records, positions))
            records, positions = [], []
    if positions:
        batches.append((records, positions))
    return batches


def open_pipeline(
    state_path: Path, identity_model: ScoringModel | None = None, poll: float = 1.0
) -> Pipeline:
    """Open the pipeline's state, waiting while another worker (the owner) holds its lock."""
    waiting = False
    while True:
        try:
            # TESSERA_KEY_STORE, when set, seals the changelog and unseals sealed input.
            return Pipeline(
                state_path, identity_model=identity_model, key_store=configured_key_store()
            )
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
    bundled: bool = False,
) -> faust.App:
    """A Faust app whose one agent runs the Pipeline over every input topic, or with
    `bundled` over the bundles ingest workers forward (the stage owner).

    Blocks until this process owns the state (see the module docstring).
    """
    source = (topics.STAGE_INPUT,) if bundled else topics.WORKER_TOPICS
    # The owner takes whatever bundles arrived (up to 64) and regroups them by batch_size.
    take = 64 if bundled else batch_size
    app, inputs = faust_app(
        bootstrap,
        data_dir,
        app_id,
        batch_size,
        input_topics=source,
        buffered=2 * take if bundled else None,
    )
    runner = StageRunner(
        open_pipeline(data_dir / "state.duckdb", identity_model), BatchProducer(bootstrap)
    )
    app.tessera_runner = runner  # type: ignore[attr-defined]
    app.tessera_pipeline = runner.pipeline  # type: ignore[attr-defined]

    @app.agent(inputs)
    async def run_stages(stream: faust.StreamT) -> None:
        loop = asyncio.get_running_loop()
        async for events in stream.take_events(take, within=batch_ms / 1000):
            batches = [
                batch
                for run in runner.replay.cut(consumed_units(events, bundled))
                for batch in (
                    bundled_batches(run, batch_size)
                    if bundled
                    else [([r for u in run for r in u.records], [])]
                )
            ]
            for batch, consumed in batches:
                # DuckDB and the producer block: keep the event loop free for heartbeats.
                # On SIGTERM this await is cancelled, but the thread finishes the batch and
                # run_worker's close() waits for it: the batch commits or rolls back whole.
                report = await loop.run_in_executor(None, runner.process, batch, consumed)
                if report is None:
                    break  # closed: what is left replays from the stored offsets
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
    role: str = "all",
    **options: int,
) -> None:
    """Run the Faust worker until SIGINT/SIGTERM: the batch in flight commits, then exit 0.

    `role`: `all` consumes the input topics itself; `stages` is the stage owner behind
    ingest workers (`pipelines/ingest.py` runs `ingest`).
    """
    bundled = role == "stages"
    app = build_app(
        bootstrap,
        data_dir,
        identity_model=identity_model,
        app_id="tessera-stages" if bundled else "tessera-worker",
        bundled=bundled,
        **options,
    )
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    try:
        worker.execute_from_commandline()
    finally:
        app.tessera_runner.close()  # type: ignore[attr-defined]
