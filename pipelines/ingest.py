"""Ingest workers: many Faust processes share the input partitions, one stage owner decides.

The stages keep state that is global by nature: the identity candidate index and
resolver store (any event may link to any earlier one, on any partition), consent per
identifier, the hash-chained lineage ledger, and the profiles, all in one DuckDB file
that allows one writer. So the work is split where the state allows it:

- **ingest workers** (`tessera worker --role ingest`, any number, consumer group
  `tessera-ingest`) share the partitions of the input topics through the group. Each
  reads its partitions in micro-batches and forwards them, raw bytes and original
  topic/partition/offset untouched, as bundles (one Arrow IPC message per up to
  `--batch-size` records) to `tessera.stages.input`, a topic with one partition. They
  keep no state, so a partition can move between them at any time.
- **the stage owner** (`tessera worker --role stages`, one active, standbys waiting for
  its state lock as in `pipelines/faust_engine.py`) consumes that one partition and runs
  every stage over the unbundled records exactly as a single worker does, recording
  the original positions in lineage and dead letters. The bundle offset it consumed is
  stored in the batch's DuckDB transaction and is where it resumes.

Nothing lost: an ingest worker's group offset never passes what it has forwarded and
the broker acknowledged (`ForwardedOffsetConsumer`), so a killed ingest worker's
partitions resume, on the survivor, at or before the first record not yet forwarded.
Records forwarded twice (the replay after a kill or a rebalance) are recognised by their
event keys at the owner: effects and outcomes stay exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import faust
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP

from pipelines import topics
from pipelines.bundles import encode_bundles
from pipelines.faust_engine import (
    RawInputConductor,
    ShortFetchConsumer,
    TesseraWorker,
    faust_app,
    ready_batches,
    tune_collector,
)
from pipelines.kafka import BatchProducer
from pipelines.pipeline import OutRecord, SourceRecord

log = logging.getLogger("tessera.ingest")


class Forwarder:
    """Forwards batches as bundles and remembers, per source partition, the next offset
    whose records the broker has not yet acknowledged in a bundle."""

    def __init__(self, producer: BatchProducer) -> None:
        self.producer = producer
        # Which worker forwarded a bundle: for operators (and tests) watching the load spread.
        self.header = (("tessera.forwarded_by", f"{socket.gethostname()}:{os.getpid()}".encode()),)
        self.forwarded: dict[TP, int] = {}
        self._lock = threading.Lock()
        self._closed = False

    def forward(self, records: Sequence[SourceRecord]) -> int | None:
        """Send the records' bundles and wait for the broker; None once closed."""
        with self._lock:
            if self._closed:
                return None
            bundles = encode_bundles(records)
            self.producer.send(OutRecord(topics.STAGE_INPUT, None, b, self.header) for b in bundles)
            for record in records:
                tp = TP(record.topic, record.partition)
                self.forwarded[tp] = max(self.forwarded.get(tp, 0), record.offset + 1)
            return len(bundles)

    def committable(self, offsets: Mapping[TP, int]) -> dict[TP, int]:
        """The offsets Faust wants to commit, none beyond what was forwarded."""
        forwarded = dict(self.forwarded)
        return {tp: min(o, forwarded[tp]) for tp, o in offsets.items() if tp in forwarded}

    def close(self) -> None:
        """Wait for the batch in flight, then release the producer."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self.producer.close()


class ForwardedOffsetConsumer(ShortFetchConsumer):
    """Faust's aiokafka consumer, committing no offset beyond the forwarded records.

    Faust acks a batch's events when the agent's loop moves on, or when it is cancelled
    (SIGTERM) while the bundle is still being sent: clamping the commit to what the
    broker acknowledged keeps the group's offset from ever leading the forwarded data.
    """

    async def _commit(self, offsets: Mapping[TP, int]) -> bool:
        forwarder: Forwarder | None = getattr(self.app, "tessera_forwarder", None)
        if forwarder is not None:
            offsets = forwarder.committable(offsets)
        if not offsets:
            return False
        return await super()._commit(offsets)


class ForwardedOffsetTransport(aiokafka_driver.Transport):
    """The aiokafka transport with the consumer above."""

    Consumer = ForwardedOffsetConsumer
    Conductor = RawInputConductor


class IngestApp(faust.App):
    """A Faust app whose consumer commits only forwarded offsets."""

    def _new_transport(self) -> ForwardedOffsetTransport:
        return ForwardedOffsetTransport(self.conf.broker_consumer, self)


def build_ingest_app(
    bootstrap: str,
    data_dir: Path,
    batch_size: int = 2000,
    batch_ms: int = 200,
    app_id: str = "tessera-ingest",
) -> faust.App:
    """A Faust app whose agent forwards its share of the input partitions to the owner."""
    app, inputs = faust_app(bootstrap, data_dir, app_id, batch_size, app_class=IngestApp)
    forwarder = Forwarder(BatchProducer(bootstrap))
    app.tessera_forwarder = forwarder  # type: ignore[attr-defined]
    tune_collector()

    @app.agent(inputs)
    async def forward(stream: faust.StreamT) -> None:
        loop = asyncio.get_running_loop()
        async for events in ready_batches(stream, batch_size, batch_ms / 1000):
            records = events.records  # built as the events arrived
            sent = await loop.run_in_executor(None, forwarder.forward, records)
            log.info("forwarded %d records in %s bundles", len(records), sent)

    return app


def run_ingest_worker(
    bootstrap: str, data_dir: Path, loglevel: str = "warn", **options: int
) -> None:
    """Run an ingest worker until SIGINT/SIGTERM: the bundle in flight is sent, then exit 0."""
    app = build_ingest_app(bootstrap, data_dir, **options)
    worker = TesseraWorker(app, loglevel=loglevel, quiet=True)
    try:
        worker.execute_from_commandline()
    finally:
        app.tessera_forwarder.close()  # type: ignore[attr-defined]
