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
import gc
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import duckdb
import faust
from faust.transport.conductor import Conductor
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP, EventT
from mode.services import WaitResults

from consent.keys import configured_key_store
from identity.model import ScoringModel
from pipelines import topics
from pipelines.bundles import decode_bundle
from pipelines.kafka import OUTPUT_SETTINGS, BatchProducer, DeliveryError, faust_credentials
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


# How long a fetch may wait at the broker for records. Faust asks aiokafka for 1,500 ms,
# and a broker that holds a fetch for its whole wait when records arrive meanwhile (Tansu
# does, measured: median 0.56 s from produce to consume) adds that much to freshness.
FETCH_WAIT_MS = 50


class ShortFetchConsumerThread(aiokafka_driver.AIOKafkaConsumerThread):
    """Faust's aiokafka consumer thread, whose fetches wait at most FETCH_WAIT_MS."""

    def _create_worker_consumer(self, transport: aiokafka_driver.Transport) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Read when the consumer starts its fetcher; Faust passes no setting for it.
        consumer._fetch_max_wait_ms = FETCH_WAIT_MS
        return consumer


def _continued(coro: Coroutine[Any, Any, Any], pending: Any) -> Generator[Any, Any, Any]:
    """The rest of `coro`, whose first step was taken and yielded `pending` (a future it
    waits on), as a generator a task can drive: values and exceptions pass through."""
    while True:
        try:
            sent = yield pending
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # a cancellation, too: it passes into `coro`
            try:
                pending = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            pending = coro.send(sent)
        except StopIteration as stop:
            return stop.value


class _Continued:
    """An awaitable over `_continued`."""

    __slots__ = ("coro", "pending")

    def __init__(self, coro: Coroutine[Any, Any, Any], pending: Any) -> None:
        self.coro, self.pending = coro, pending

    def __await__(self) -> Generator[Any, Any, Any]:
        return _continued(self.coro, self.pending)


class DirectDeliveryConsumer(aiokafka_driver.Consumer):
    """Faust's aiokafka consumer, handing each fetched message to the streams without
    four tasks per message.

    Faust's fetch loop delivers every message with `wait_first(callback(message),
    suspend_flow.wait())`, which wraps the callback, the flow event and the consumer's
    stopped and crashed events in tasks and waits for the first: measured, about 60% of
    the bare consumer's CPU (the only caller with two coroutines and no timeout is that
    loop). Delivery almost never waits (only when a stream's buffer is full
    or flow is suspended for a rebalance), so here the callback's first step runs at once;
    when it completes there, nothing else would have happened. When it has to wait, the
    rest of it goes through `wait_first` as before, so a suspended flow or a stop still
    interrupts (and cancels) a delivery exactly as in Faust.
    """

    async def wait_first(self, *coros: Any, timeout: Any = None) -> WaitResults:
        if (
            len(coros) == 2
            and timeout is None
            and asyncio.iscoroutine(coros[0])
            and asyncio.iscoroutine(coros[1])
            and not (self.suspend_flow.is_set() or self._stopped.is_set() or self._crashed.is_set())
        ):
            delivery, other = coros
            try:
                pending = delivery.send(None)
            except StopIteration as done:
                other.close()  # never started: the flow event was not awaited
                return WaitResults([delivery], [done.value], False)
            except BaseException:
                other.close()
                raise
            return await super().wait_first(_Continued(delivery, pending), other)
        return await super().wait_first(*coros, timeout=timeout)


class ShortFetchConsumer(DirectDeliveryConsumer):
    """Faust's aiokafka consumer, whose fetches wait at most FETCH_WAIT_MS."""

    def _new_consumer_thread(self) -> ShortFetchConsumerThread:
        return ShortFetchConsumerThread(self, loop=self.loop, beacon=self.beacon)


class StoredOffsetConsumer(ShortFetchConsumer):
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


class RawInput(faust.Topic):
    """Input topics whose events carry each message's key and value bytes as consumed.

    Faust's decoding with the `raw` serializers gives the same bytes through its codec
    registry and model detection, per message (measured: about a sixth of the event
    loop's CPU while consuming); here the event is made from the message directly.
    """

    event_of: Callable[[Any], EventT]

    def _compile_decode(self) -> None:
        app, event_class = self.app, self.app.conf.Event

        def event_of(message: Any) -> EventT:
            return event_class(app, message.key, message.value, message.headers, message)

        async def decode(message: Any, *, propagate: bool = False) -> EventT:
            return event_of(message)

        self.event_of = event_of
        self.decode = decode  # type: ignore[method-assign]


class RawInputConductor(Conductor):
    """Faust's conductor, delivering the messages of a partition read by one `RawInput`
    channel alone (the worker's case) with a lean handler; any other case as Faust does."""

    def _build_handler(self, tp: TP, channels: Any) -> Any:
        if len(channels) == 1:
            (channel,) = channels
            if isinstance(channel, RawInput):
                return _raw_delivery(self.app, tp, channel)
        return super()._build_handler(tp, channels)


def _raw_delivery(app: faust.App, tp: TP, channel: RawInput) -> Any:
    """What Faust's per-partition handler does for one channel, without its per-message
    wait on the buffer of Faust's own producer (this app produces nothing through it)
    and its serializer lookups: wait while flow is suspended (a rebalance), count the
    message's one reference, queue its event, and stop fetching the partition while the
    queue is under pressure (Faust resumes it when the queue drains)."""
    acquire_flow_control = app.flow_control.acquire
    event_of = channel.event_of
    on_topic_buffer_full = app.sensors.on_topic_buffer_full
    consumer = app.consumer
    queue = channel.queue

    def on_pressure_high() -> None:
        on_topic_buffer_full(tp)
        consumer.on_buffer_full(tp)

    def on_pressure_drop() -> None:
        consumer.on_buffer_drop(tp)

    async def on_message(message: Any) -> None:
        await acquire_flow_control()
        message.incref(1)
        event = event_of(message)
        if queue.full():
            on_topic_buffer_full(tp)
            await channel.put(event)
        else:
            queue.put_nowait_enhanced(
                event, on_pressure_high=on_pressure_high, on_pressure_drop=on_pressure_drop
            )

    return on_message


class StoredOffsetTransport(aiokafka_driver.Transport):
    """The aiokafka transport with the consumer above."""

    Consumer = StoredOffsetConsumer
    Conductor = RawInputConductor


class TesseraApp(faust.App):
    """A Faust app whose consumer resumes from the pipeline's stored offsets."""

    def _new_transport(self) -> StoredOffsetTransport:
        return StoredOffsetTransport(self.conf.broker_consumer, self)


class TesseraWorker(faust.Worker):
    """Faust's worker, whose root logger stays at the level asked for.

    Faust sets the root logger to DEBUG so that its startup spinner turns on every record,
    and leaves the filtering to the handler: then every debug call of aiokafka, mode and
    Faust (per fetch request, frame sent or read, timer tick) builds a record only for the
    handler to drop it.
    """

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        super().on_setup_root_logger(logger, level)
        if level:
            logger.setLevel(level)


# Young collections at most every this many net allocations of tracked objects, instead of
# Python's 700: the event loop allocates several per consumed message (the event, its
# message and record, delivery futures) and holds a batch of them, so the collector ran
# every few hundred messages and, every few dozen of those, a full pass over the heap.
YOUNG_COLLECTION_EVERY = 100_000


def tune_collector() -> None:
    """Keep the cyclic garbage collector off the consuming path: what exists once the
    worker is set up (modules, the pipeline, its caches) moves to the permanent generation
    (`gc.freeze`), which full collections no longer walk, and young collections run every
    `YOUNG_COLLECTION_EVERY` allocations. Reference counting frees as before; only cycles
    wait longer. The stages pause the collector during a batch anyway (pipelines/pipeline.py).
    """
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_EVERY, middle, old)


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
    inputs = RawInput(app, topics=list(input_topics), value_serializer="raw", key_serializer="raw")
    return app, inputs


class ReadyBatch(list):
    """A batch's events (a list), with `records`: the same events as the Pipeline's
    records, built as each event arrived (while the batch before was running) rather than
    when the batch is handed over, when the stage thread waits for them."""

    __slots__ = ("records",)

    records: list[SourceRecord]


# A batch is cut once the events already fetched are in: at the first pause this long
# between two arrivals (events of one fetch reach the stream microseconds apart).
SETTLE_SECONDS = 0.005


async def ready_batches(
    stream: faust.StreamT, max_events: int, within: float, settle: float = SETTLE_SECONDS
) -> AsyncIterator[ReadyBatch]:
    """The stream's events in batches of what has arrived, for an agent to process.

    Unlike Faust's `take_events`, which stops taking while the agent works on a batch and
    then waits out `within` every time, events keep arriving into the next batch while
    the current one is processed (at most `max_events` of them: then the stream stalls and
    Faust stops fetching, so memory stays bounded). When the previous batch is done, what
    arrived while it ran is the next batch, at once: waiting for more would only hold the
    events already in, and the agent idle. Events that reach an idle agent are handed over
    once the arrivals pause for `settle` seconds (the rest of their fetch is in), the batch
    holds `max_events`, or `within` seconds have passed since it was first looked at. So
    at a low rate a batch is what came in while the last one ran (small, fresh), and under
    a backlog batches grow to `max_events`, where per-batch costs are amortised.

    Each event is acknowledged after the agent has finished with its batch: once the next
    batch is handed over (or there is none yet), so that the stage thread does not wait
    for the acknowledgements in between (they only move Faust's committed offsets, a
    progress indicator: the stored offsets are where the worker resumes).
    """
    pending: list[EventT] = []
    records: list[SourceRecord] = []
    arrived = asyncio.Event()
    room = asyncio.Event()
    room.set()
    await stream.maybe_start()
    collector = asyncio.ensure_future(_collect(stream, pending, records, arrived, room, max_events))
    loop = asyncio.get_running_loop()
    # Whether the events pending arrived while the agent ran a batch: then they are cut as
    # soon as it is done, without a settle (which costs the agent `settle` or more a batch).
    came_meanwhile = False
    try:
        while not stream.should_stop:
            if collector.done():
                collector.result()  # its error, if it failed; else the stream stopped
                return
            if not pending:
                arrived.clear()
                await stream.wait_for_stopped(arrived, timeout=1.0)  # type: ignore[arg-type]
                continue
            cutoff = loop.time() + within
            seen = len(pending) if came_meanwhile else 0
            while seen < len(pending) < max_events and (left := cutoff - loop.time()) > 0:
                seen = len(pending)
                # Grew meanwhile: more of the fetch is coming.
                await asyncio.sleep(min(settle, left))
            batch = ReadyBatch(pending)
            batch.records = records[:]
            pending.clear()
            records.clear()
            room.set()
            try:
                yield batch
            except BaseException:  # stopping: acknowledged before the stream goes
                _acknowledge(stream, batch)
                raise
            loop.call_soon(_acknowledge, stream, batch)
            came_meanwhile = bool(pending)
    finally:
        collector.cancel()


async def _collect(
    stream: faust.StreamT,
    pending: list[EventT],
    records: list[SourceRecord],
    arrived: asyncio.Event,
    room: asyncio.Event,
    max_events: int,
) -> None:
    """Move the events the consumer delivers to the stream's channel into `pending`, and
    their records into `records`, all that are queued at once, until `pending` holds
    `max_events` (then wait for `room`).

    The channel's queue is read directly rather than through the stream's iterator, which
    runs every event through the event loop, the stream's processors and Faust's sensors
    one at a time (measured: about as much CPU as the rest of consuming). What the stream
    does per event that matters is kept: an event delivered before a rebalance (flow
    stopped, or an older consumer generation) is skipped and acknowledged, as the stream
    skips it, and each taken message is tracked as unacknowledged until its batch is done.
    """
    app = stream.app
    queue = stream.channel.queue  # type: ignore[attr-defined]
    flow = app.flow_control
    consumer = app.consumer
    acking = app.topics.acking_topics
    track = consumer.unacked.add  # type: ignore[attr-defined]
    while not stream.should_stop:
        event = await queue.get()
        while True:
            message = event.message
            if flow.is_active() and message.generation_id == app.consumer_generation_id:
                if message.topic in acking and not message.tracked:
                    message.tracked = True
                    track(message)
                pending.append(event)
                records.append(
                    SourceRecord(
                        message.topic, message.partition, message.offset, message.value, message.key
                    )
                )
            else:
                message.ack(consumer)
            if len(pending) >= max_events or queue.empty():
                break
            event = queue.get_nowait()
        arrived.set()
        if len(pending) >= max_events:
            room.clear()
            await room.wait()


def _acknowledge(stream: faust.StreamT, events: list[EventT]) -> None:
    """Acknowledge a processed batch's messages to Faust's consumer (its committed offsets)."""
    consumer = stream.app.consumer
    for event in events:
        event.message.ack(consumer)


def consumed_units(events: ReadyBatch, bundled: bool) -> list[Unit]:
    """What was consumed, position by position: each record itself (`events.records`), or
    a bundle and the records it carries."""
    if not bundled:
        return [Unit(r, (r,)) for r in events.records]
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
        open_pipeline(data_dir / "state.duckdb", identity_model),
        BatchProducer(bootstrap, **OUTPUT_SETTINGS),
    )
    app.tessera_runner = runner  # type: ignore[attr-defined]
    app.tessera_pipeline = runner.pipeline  # type: ignore[attr-defined]
    # Every batch on one thread of its own: from the shared pool, a batch handed over as the
    # last one returns can find that thread not idle yet and start another (two threads of
    # 14.1 and 4.8 CPU-s for one run's batches, measured).
    stage_thread = ThreadPoolExecutor(1, thread_name_prefix="tessera-stages")
    tune_collector()

    @app.agent(inputs)
    async def run_stages(stream: faust.StreamT) -> None:
        loop = asyncio.get_running_loop()
        async for events in ready_batches(stream, take, batch_ms / 1000):
            if not (bundled or runner.replay.waiting):
                # The usual case: the events as one batch, without a unit per record for
                # the cut to pass through whole (it releases everything once not waiting).
                batches = [(events.records, [])] if events else []
            else:
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
                report = await loop.run_in_executor(stage_thread, runner.process, batch, consumed)
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
    worker = TesseraWorker(app, loglevel=loglevel, quiet=True)
    try:
        worker.execute_from_commandline()
    finally:
        app.tessera_runner.close()  # type: ignore[attr-defined]
