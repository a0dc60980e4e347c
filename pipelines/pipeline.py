"""The pipeline: every stage over one micro-batch, in one DuckDB transaction.

contract -> consent gate -> identity -> profile builder, then the outputs (dead letters,
lineage, identity links, profile changes) are handed to the engine's `emit`, and only
when emit returns is the state committed. A crash before the commit replays the batch;
event keys make the replay change nothing twice.

No Kafka or engine import lives here: Faust and Flink adapters call `process`.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import lru_cache
from operator import attrgetter
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from consent.erasure import SubjectEraser
from consent.gate import ALLOWED, CONSENT_RECORDED, ConsentGate, GateDecision, stated_consent
from consent.keys import SubjectKeyStore, profile_subjects
from consent.ledger import LineageLedger
from consent.policy import PurposePolicy, load_policy
from consent.requests import PrivacyRequests
from identity.model import ScoringModel
from identity.normalise import identifier_hash
from identity.records import identity_record
from identity.resolver import IdentityResolver, Resolution
from pipelines import topics
from pipelines.identity_commands import RejectLink, parse_command
from pipelines.state_memory import StateMemory
from pipelines.stored_keys import StoredKeys
from profiles.builder import ProfileBuilder, traits_of
from profiles.segments import Segment, SegmentMembership, load_segments
from quality.metrics import batch_quality_record
from quality.reasons import ReasonCode
from quality.suites import QualityRow, QualityStage, QualityVerdict
from schemas.contract import ContractResult, Reason, check_contract
from schemas.registry import SchemaRegistry, default_registry

APPLIED, REJECTED, WITHHELD = "applied", "rejected", "withheld"
log = logging.getLogger("tessera.pipeline")

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS outcomes (
    event_key VARCHAR PRIMARY KEY, payload_hash VARCHAR, topic VARCHAR, "partition" INTEGER,
    "offset" BIGINT, kind VARCHAR, outcome VARCHAR, reason VARCHAR, person_id VARCHAR
);
CREATE TABLE IF NOT EXISTS source_offsets (
    topic VARCHAR, "partition" INTEGER, next_offset BIGINT, PRIMARY KEY (topic, "partition")
);
CREATE TABLE IF NOT EXISTS batch_journal (slot INTEGER PRIMARY KEY, extent VARCHAR);
"""

# Stored keys a batch may repeat (`StoredKeys`) up to this many are read through the
# outcomes key index, ~30 us a key; more are joined against the whole table, which costs
# as much as ~5,000 index reads at 3M rows (DuckDB 2.0, measured).
INDEX_LOOKUPS = 1_000

# WAL written before DuckDB folds it into the database file (see open_state).
CHECKPOINT_WAL = "256MB"

# Where a batch was read: (topic, partition) -> (first offset, last offset), both included.
Extent = dict[tuple[str, int], tuple[int, int]]


@dataclass(frozen=True)
class SourceRecord:
    """One consumed Kafka message, exactly as it arrived."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None


@dataclass(frozen=True)
class OutRecord:
    """One message the pipeline asks the engine to produce."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()

    def __init__(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: tuple[tuple[str, bytes], ...] = (),
    ) -> None:
        # A batch makes one per output (~13,000 per 10,000 events): the generated frozen
        # init sets each field through object.__setattr__, about three times slower.
        fields = self.__dict__
        fields["topic"], fields["key"], fields["value"] = topic, key, value
        fields["headers"] = headers


@dataclass
class BatchReport:
    """What one batch did: outcome counts, duplicates skipped, profiles changed."""

    outcomes: Counter = field(default_factory=Counter)
    duplicates: int = 0
    profiles_changed: int = 0
    merges: int = 0

    @property
    def received(self) -> int:
        return sum(self.outcomes.values())

    def merged(self, other: BatchReport) -> BatchReport:
        """The report of two consecutive parts of one batch."""
        return BatchReport(
            self.outcomes + other.outcomes,
            self.duplicates + other.duplicates,
            self.profiles_changed + other.profiles_changed,
            self.merges + other.merges,
        )


@dataclass(slots=True)
class _Item:
    record: SourceRecord
    contract: ContractResult
    payload_hash: str
    key: str
    decision: GateDecision | None = None
    person_id: str | None = None
    record_id: str | None = None  # the identity record an applied event resolved into


_CONTROL_TOPICS = (topics.IDENTITY_COMMANDS, topics.PRIVACY)


def _erased_contract() -> ContractResult:
    reason = Reason(ReasonCode.SUBJECT_ERASED, "sealed under a key erasure deleted")
    return ContractResult(reasons=[reason])


def _hash(raw: bytes) -> str:
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def _json(value: Any) -> bytes:
    # An exact copy: a batch's outputs live until emit returns, and each kept orjson result
    # held fresh memory well beyond its length (measured: 100,000 kept 600-byte results grew
    # RSS by 800 MB, ~14 us of page faults each). A copy frees orjson's buffer for reuse.
    return bytes(memoryview(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)))


def _dead_letter(
    record: SourceRecord, key: str, reasons: list[Reason], schema: str, payload_hash: str
) -> OutRecord:
    """The dead letter of one rejected event: its original bytes, reasons and provenance."""
    return OutRecord(
        topics.REJECTED,
        key.encode(),
        record.value or b"",
        (
            ("tessera.reason", reasons[0].code.value.encode()),
            ("tessera.reasons", _json([r.as_dict() for r in reasons])),
            ("tessera.event_key", key.encode()),
            ("tessera.source.topic", record.topic.encode()),
            ("tessera.source.partition", str(record.partition).encode()),
            ("tessera.source.offset", str(record.offset).encode()),
            ("tessera.schema", schema.encode()),
            (
                "tessera.rejected_at",
                datetime.now(UTC).isoformat(timespec="milliseconds").encode(),
            ),
            ("tessera.payload_hash", payload_hash.encode()),
        ),
    )


# An identifier's published hash, kept across batches: a stream repeats its persons'
# identifiers batch after batch (20,000 events at batch 1,000: 16,982 hashed a batch at a
# time, 2,223 distinct), and each was a sha256 and its hex digest.
_subject_hash = lru_cache(maxsize=65536)(identifier_hash)


def _attribute_names(event: dict[str, Any]) -> list[str]:
    """The sorted names of the attributes an event states about its person (`traits_of`)."""
    traits = traits_of(event)  # none, for most events: no generator and sort for them
    return sorted([str(name)[:128] for name in traits]) if traits else []


class _StageFailure(Exception):
    """A stage raised while processing a batch's content (not the engine's emit)."""


# Failures of the machine rather than of an event: never a reason to dead-letter one.
_ENVIRONMENT_ERRORS = (OSError, MemoryError, duckdb.IOException, duckdb.OutOfMemoryException)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while a batch runs: a batch allocates millions of
    objects that live until it ends, and each automatic pass re-scanned them (measured on
    the profile accumulators: 40% of their Python time). Reference counting still frees
    as usual; cycles wait for the next collection after the batch."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# Where a record sits in its topic, (topic, partition, offset): the order batches are
# processed in (an attrgetter: no Python call per record in the sort of every batch).
_POSITION = attrgetter("topic", "partition", "offset")


STATE_THREADS_ENV = "TESSERA_STATE_THREADS"
DEFAULT_STATE_THREADS = 1


def state_threads(env: Mapping[str, str] | None = None) -> int:
    """DuckDB's worker threads on a state connection: `TESSERA_STATE_THREADS` (in `env`,
    default os.environ), else DEFAULT_STATE_THREADS; raises ValueError unless a count >= 1."""
    env = os.environ if env is None else env
    raw = env.get(STATE_THREADS_ENV, "").strip()
    if not raw:
        return DEFAULT_STATE_THREADS
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        raise ValueError(f"{STATE_THREADS_ENV}={raw!r} is not a thread count of 1 or more")
    return int(raw)


def open_state(path: Path | str, memory: StateMemory | None = None) -> duckdb.DuckDBPyConnection:
    """Open (creating if needed) a DuckDB state file with the session settings stages rely on;
    `memory` bounds DuckDB's memory (default: `StateMemory.from_env()`)."""
    memory = memory or StateMemory.from_env()  # a bad setting fails before the file opens
    conn = duckdb.connect(str(path))
    conn.execute("SET TimeZone = 'UTC'")
    # A commit is durable once its WAL is written; a checkpoint then rewrites every row
    # group the batches touched (the tail of each append-only table, trait_deltas included).
    # DuckDB's default 16 MB of WAL checkpointed after every 10k-event batch (~20 MB of WAL).
    # A checkpoint's CPU grows with the WAL it folds, plus a part per checkpoint: at 300,000
    # persons, five 10k-event batches cost 1.61 CPU-s per batch in commits and checkpoints
    # at 64 MB (a checkpoint every ~3 batches) against 1.24 at 256 MB (one, at the end;
    # `bench_stages --warm-persons 300000`, one invocation). Its memory peak, and the rows
    # held in memory until it, grow with the WAL (~160 MB more per batch folded): 256 MB
    # trades that memory for the CPU. A restart replays up to that much WAL.
    conn.execute(f"SET checkpoint_threshold = '{CHECKPOINT_WAL}'")
    # One worker thread: a batch runs ~70 statements, most over a few thousand rows, and
    # handing their work to a second thread cost more CPU than it saved. Measured with
    # `bench_stages` runs alternating one and two threads: 0.91x the CPU-seconds on an
    # empty store (batches of 1,000 and of 10,000), 0.95x on a store of 300,000 persons.
    # Nor does a second thread shorten a batch on the clock, with a core to spare: over the
    # same 100,000 events in batches of 5,000, one process alternating the settings (load
    # 1.3-1.9 on 2 cores), two threads cost 1.10x the process's CPU, took 3% off the stage
    # thread's own and made the batches 1.06x slower; two only around the rebuild (`SET
    # threads` costs ~0.4 ms a pair), 1.06x the CPU and the same wall. At batches of 1,000,
    # 1.11x and 1.19x the CPU, both slower. Live at 5,000 events/s (`bench_live`, six
    # pairs on a machine shared with other work), two threads: p99 6.43 s against 6.05 s
    # (medians), the same drain, 1.02x the worker's CPU per event (BENCHMARKS, *DuckDB's
    # threads on the state*). `TESSERA_STATE_THREADS` sets the count.
    conn.execute(f"SET threads = {state_threads()}")
    # Most of a checkpoint at 300,000 persons is DuckDB merging part-filled row groups (its
    # vacuum; appends after a checkpoint start a row group of their own): lineage's 49k new
    # rows made it rewrite 339k. Without merging (`max_vacuum_tasks = 0`) the checkpoint of
    # five 10k-event batches cost 0.8 CPU-s, not 4.4-4.7, but a merging one every 500,000
    # events (deleted rows need one) then cost as much as the merges it put off (0.98x over
    # 500,000 events in all) and left a 1.25x larger file: merging stays on.
    # DuckDB's share of the process's memory, bounded (TESSERA_STATE_MEMORY_LIMIT) and
    # spilling beside the state file: see pipelines/state_memory.py.
    memory.apply(conn, path)
    return conn


class Pipeline:
    """The four stages over a micro-batch, with all their state in one DuckDB database."""

    def __init__(
        self,
        state_path: Path | str = ":memory:",
        policy: PurposePolicy | None = None,
        registry: SchemaRegistry | None = None,
        identity_model: ScoringModel | None = None,
        quality: QualityStage | bool = True,
        key_store: SubjectKeyStore | None = None,
        segments: dict[str, Segment] | None = None,
    ) -> None:
        # Quality suites on by default; False turns them off (the bench's baseline).
        self.quality = QualityStage() if quality is True else (quality or None)
        self.registry = registry or default_registry()
        self.policy = policy or load_policy(known_kinds=set(self.registry.kinds()))
        self.conn = open_state(state_path)
        self.conn.execute(SCHEMA_SQL)
        if self.quality is not None:
            self.quality.prepare(self.conn)  # its table, outside any batch's transaction
        self.stored_keys = StoredKeys(self.conn, "outcomes", "event_key")
        self.gate = ConsentGate(self.conn, self.policy)
        self.identity = IdentityResolver(self.conn, identity_model)
        self.builder = ProfileBuilder(self.conn, self.policy)
        self.builder.records_of = self.identity.records_of_persons
        self.builder.merged_into = self.identity.merged_into
        self.segments = SegmentMembership(
            self.conn,
            self.builder.traits,
            segments
            if segments is not None
            else load_segments(self.builder.traits, set(self.policy.purposes)),
        )
        self.ledger = LineageLedger(self.conn)
        # Per-subject keys (None: nothing is sealed); erasure requests and their certificates.
        self.keys = key_store
        self.privacy = PrivacyRequests(SubjectEraser(self.conn, self.identity, key_store))

    def close(self) -> None:
        self.conn.close()

    def committed_offsets(self) -> dict[tuple[str, int], int]:
        """The next offset to consume per (topic, partition), as of the last commit."""
        rows = self.conn.execute('SELECT topic, "partition", next_offset FROM source_offsets')
        return {(t, p): o for t, p, o in rows.fetchall()}

    def interrupted_extent(self) -> Extent:
        """The part of the last journalled batch the state does not hold: empty unless the
        process stopped between that batch's outputs and its commit."""
        rows = self.conn.execute("SELECT extent FROM batch_journal WHERE slot = 0").fetchall()
        if not rows:
            return {}
        committed = self.committed_offsets()
        pending: Extent = {}
        for topic, partition, first, last in orjson.loads(rows[0][0]):
            done = committed.get((topic, partition), 0)
            if done <= last:
                pending[(topic, partition)] = (max(first, done), last)
        return pending

    def _journal(self, positions: Sequence[SourceRecord]) -> None:
        """Record where this batch was read, before it runs, in a commit of its own."""
        extent: dict[tuple[str, int], list[int]] = {}
        for record in positions:
            offset = record.offset
            span = extent.get((record.topic, record.partition))
            if span is None:
                extent[(record.topic, record.partition)] = [offset, offset]
            elif offset < span[0]:
                span[0] = offset
            elif offset > span[1]:
                span[1] = offset
        rows = [[t, p, first, last] for (t, p), (first, last) in sorted(extent.items())]
        text = orjson.dumps(rows).decode()
        # The one row is updated in place once it exists: an INSERT OR REPLACE deletes and
        # inserts it through the key index, ~4x the CPU (1.0 against 0.27 ms, commit included).
        (updated,) = self.conn.execute(
            "UPDATE batch_journal SET extent = ? WHERE slot = 0", [text]
        ).fetchone()
        if not updated:
            self.conn.execute("INSERT INTO batch_journal VALUES (0, ?)", [text])

    def process(
        self,
        batch: Sequence[SourceRecord],
        emit: Callable[[list[OutRecord]], None],
        consumed: Sequence[SourceRecord] = (),
    ) -> BatchReport:
        """Run one micro-batch through every stage.

        In: consumed records in partition order, and `emit`, which must durably produce
        the outputs or raise. Out: a BatchReport. State commits only after emit returns.
        `consumed`: where the engine read the batch when that is not the records' own
        positions (bundles forwarded by ingest workers); stored with the batch's offsets.
        The batch is processed in (topic, partition, offset) order, so how an engine
        interleaved the partitions it consumed changes nothing (engine parity).

        Before anything runs, the batch's extent is journalled (committed on its own): if
        the process dies after emitting and before the commit, `interrupted_extent` tells
        the engine which batch to replay, exactly (pipelines/replay.py).

        A stage that raises on some event's content would fail every retry of the batch
        and stall its partition: the batch is split until the event that fails alone is
        found, and that event is dead-lettered with `internal_error`; the rest proceed.
        """
        batch = sorted(batch, key=_POSITION)
        self._journal(consumed or batch)
        with _collector_paused():
            return self._process_split(batch, emit, consumed)

    def _process_split(
        self,
        batch: Sequence[SourceRecord],
        emit: Callable[[list[OutRecord]], None],
        consumed: Sequence[SourceRecord] = (),
    ) -> BatchReport:
        try:
            return self._process_once(batch, emit, consumed)
        except _StageFailure as failure:
            if len(batch) == 1:
                return self._quarantine(batch[0], failure.__cause__, emit, consumed)
            log.warning("a stage failed on a batch of %d; isolating the event", len(batch))
            half = len(batch) // 2
            # `consumed` is done only when the last part is: it commits with that part.
            first = self._process_split(batch[:half], emit)
            return first.merged(self._process_split(batch[half:], emit, consumed))

    def _process_once(
        self,
        batch: Sequence[SourceRecord],
        emit: Callable[[list[OutRecord]], None],
        consumed: Sequence[SourceRecord] = (),
    ) -> BatchReport:
        self.conn.execute("BEGIN TRANSACTION")
        try:
            try:
                report, outputs = self._process(batch)
            except _ENVIRONMENT_ERRORS:
                raise  # the machine, not the data: retrying the batch is right
            except Exception as exc:
                raise _StageFailure(str(exc)) from exc
            self._record_offsets(consumed)
            emit(outputs)
            self._commit()
        except BaseException:
            self.conn.execute("ROLLBACK")
            self.identity.forget()  # its in-memory index saw the batch the store did not keep
            self.stored_keys.forget()  # so did the stored keys
            self.gate.forget()  # and the consent it keeps
            raise
        return report

    def _commit(self) -> None:
        """Make the batch's state durable: DuckDB appends its rows to the tables and their
        indexes and writes them to the WAL; past `CHECKPOINT_WAL` a checkpoint follows."""
        self.conn.execute("COMMIT")

    def _quarantine(
        self,
        record: SourceRecord,
        error: BaseException | None,
        emit: Callable,
        consumed: Sequence[SourceRecord] = (),
    ) -> BatchReport:
        """Dead-letter one event a stage cannot process, keeping its offset moving.

        Its outcome is the dead letter alone (not the outcomes table), so once the stage
        is fixed, re-driving the unchanged bytes processes the event.
        """
        raw = record.value or b""
        digest = _hash(raw)
        detail = f"{type(error).__name__}: {error}"[:300]
        log.error(
            "event at %s/%d@%d dead-lettered: %s",
            record.topic,
            record.partition,
            record.offset,
            detail,
        )
        reasons = [Reason(ReasonCode.INTERNAL_ERROR, detail)]
        self.conn.execute("BEGIN TRANSACTION")
        try:
            self._record_offsets([record, *consumed])
            emit([self._sealed(_dead_letter(record, f"raw:{digest}", reasons, "unknown", digest))])
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        report = BatchReport()
        report.outcomes[REJECTED] += 1
        return report

    def _classify(self, batch: Sequence[SourceRecord], report: BatchReport) -> list[_Item]:
        items: list[_Item] = []
        for record in batch:
            raw = record.value or b""
            opened = self.keys.open(raw) if self.keys else raw  # None: its subject was erased
            contract = (
                check_contract(opened, self.registry) if opened is not None else _erased_contract()
            )
            digest = _hash(opened if opened is not None else raw)  # sealed or not, one event
            key = contract.event["messageId"] if contract.ok else f"raw:{digest}"
            items.append(_Item(record, contract, digest, key))
        # Only keys the stored-key hashes hold can be stored: in a stream of new events,
        # none, and the outcomes table is not read at all; a few are read by key.
        keys = pa.array([i.key for i in items], pa.string())
        maybe = self.stored_keys.maybe_stored(pa.table({"event_key": keys}))
        known = []
        maybe = sorted(set(maybe))
        if 0 < len(maybe) <= INDEX_LOOKUPS:  # a few redelivered events: no table scan
            marks = ", ".join("?" * len(maybe))
            known = self.conn.execute(
                f"SELECT event_key, payload_hash, outcome FROM outcomes WHERE event_key IN ({marks})",
                maybe,
            ).fetchall()
        elif maybe:
            _batch_keys = pa.table({"event_key": maybe})  # read by name (a replacement scan)
            known = self.conn.execute(
                "SELECT event_key, payload_hash, outcome FROM outcomes JOIN _batch_keys USING (event_key)"
            ).fetchall()
        seen = {key: payload_hash for key, payload_hash, _ in known}
        rejected_before = {key for key, _, outcome in known if outcome == REJECTED}
        fresh: list[_Item] = []
        for item in items:
            known_hash = seen.get(item.key)
            if known_hash is None:
                seen[item.key] = item.payload_hash
                fresh.append(item)
            elif known_hash == item.payload_hash:
                report.duplicates += 1  # a replay: its outcome is already recorded
            else:
                # Same messageId, different content: a distinct event, never silently dropped.
                raw_key = f"raw:{item.payload_hash}"
                if raw_key in seen or self._known(raw_key):
                    report.duplicates += 1
                    continue
                if item.key in rejected_before:
                    # A fixed version of a rejected event (a DLQ replay): it gets its own outcome.
                    item.key = raw_key
                    seen[raw_key] = item.payload_hash
                    fresh.append(item)
                    continue
                item.contract.reasons.append(
                    Reason(ReasonCode.DUPLICATE_EVENT_ID, f"messageId {item.key[:64]!r} reused")
                )
                item.key = raw_key
                seen[raw_key] = item.payload_hash
                fresh.append(item)
        return fresh

    def _known(self, key: str) -> bool:
        if not self.stored_keys.holds(key):
            return False  # the table is read only for keys whose hash is held
        return bool(
            self.conn.execute("SELECT 1 FROM outcomes WHERE event_key = ?", [key]).fetchall()
        )

    def _process(self, batch: Sequence[SourceRecord]) -> tuple[BatchReport, list[OutRecord]]:
        report = BatchReport()
        commands = [r for r in batch if r.topic == topics.IDENTITY_COMMANDS]
        requests = [r for r in batch if r.topic == topics.PRIVACY]
        items = self._classify([r for r in batch if r.topic not in _CONTROL_TOPICS], report)
        verdict = self._check_quality(items)
        valid = [i for i in items if i.contract.ok]
        decisions = self.gate.decide(
            [
                (
                    i.key,
                    i.contract.kind,
                    i.contract.event,
                    i.contract.timestamp,
                    i.contract.identifiers,
                )
                for i in valid
            ]  # type: ignore[misc]
        )
        for item, decision in zip(valid, decisions, strict=True):
            item.decision = decision
        # A consent change re-scopes the views of every person holding its identifiers.
        consent_changed = self.builder.persons_holding(self.gate.last_changed)
        linked = [i for i in valid if i.decision.decision == ALLOWED]  # type: ignore[union-attr]
        # Each record with its id: a person's events repeat one record, worked out once.
        identified = [identity_record(i.contract.event) for i in linked]  # type: ignore[arg-type]
        records = [record for record, _ in identified]
        resolution = self.identity.resolve(
            [(i.key, i.contract.timestamp, r) for i, r in zip(linked, records, strict=True)],  # type: ignore[misc]
            [record_id for _, record_id in identified],
        )
        for item, person_id, (_, record_id) in zip(
            linked, resolution.person_of, identified, strict=True
        ):
            item.person_id = person_id
            item.record_id = record_id
        self.builder.repoint(resolution.merged)
        changed = self.builder.add(
            [
                (
                    i.key,
                    i.person_id,
                    i.contract.kind,
                    i.contract.event,
                    i.contract.timestamp,
                    i.record_id,
                )
                for i in linked
            ],  # type: ignore[misc]
            # None recorded: only events without an outcome come this far (`_classify`),
            # and a fact is written in the transaction of its event's outcome.
            fresh=True,
        )
        command_items, decided = self._apply_commands(commands, report)
        erasures = self.privacy.erase(requests, key_of=_hash, known=self._known)
        if requests:
            self.gate.forget()  # an erasure deletes consent and marks subjects erased
        report.duplicates += erasures.duplicates
        decided += erasures.resolutions
        raised = self.identity.apply_threshold("identity-threshold", datetime.now(UTC))
        if raised is not None:
            decided.append(raised)
        resolution.log.extend(e for r in decided for e in r.log)
        touched = set().union(*(r.touched for r in decided)) if decided else set()
        for split in decided:
            self.builder.reassign(split.moved)
        profiles, gone = self._rebuild(
            changed | resolution.touched | touched | consent_changed | erasures.persons, resolution
        )
        segment_changes = self.segments.update(
            profiles,
            gone,
            [i.contract.timestamp for i in linked],  # type: ignore[misc]
        )
        items += command_items + [
            _Item(r.record, r.contract, r.payload_hash, r.key, r.decision) for r in erasures.items
        ]
        entries = self.ledger.append([self._lineage_entry(i) for i in valid])
        entries += self.privacy.certify(self.ledger)
        self._record_outcomes(items, report)
        self._record_offsets(batch)
        report.profiles_changed = len(profiles)
        report.merges = len(resolution.merged)
        outputs = self._outputs(items, entries, resolution, profiles, gone)
        outputs += [OutRecord(topics.ERASURES, k, v) for k, v in erasures.certificates]
        if verdict is not None and items:
            outputs.append(OutRecord(topics.QUALITY_REPORTS, *self._quality_record(items, verdict)))
        outputs += [
            OutRecord(
                topics.SEGMENT_CHANGES,
                f"{change['segment']}:{change['person_id']}".encode(),
                _json(change),
            )
            for change in segment_changes
        ]
        return report, outputs

    def _apply_commands(
        self, commands: list[SourceRecord], report: BatchReport
    ) -> tuple[list[_Item], list[Resolution]]:
        """Apply operators' identity commands in order; a bad one is rejected with a reason."""
        items: list[_Item] = []
        decided: list[Resolution] = []
        for record in commands:
            raw = record.value or b""
            command = parse_command(raw)
            digest = _hash(raw)
            key = (
                f"cmd:{command.command_id}" if isinstance(command, RejectLink) else f"raw:{digest}"
            )
            if self._known(key) or any(i.key == key for i in items):
                report.duplicates += 1
                continue
            contract = ContractResult(kind="identity_command", version=1)
            if isinstance(command, RejectLink):
                try:
                    decided.append(
                        self.identity.reject_link(
                            command.record_a,
                            command.record_b,
                            f"{command.operator}: {command.reason}",
                            key,
                            command.requested_at,
                        )
                    )
                except KeyError as exc:
                    command = str(exc).strip("'\"")
            if not isinstance(command, RejectLink):
                contract.reasons.append(Reason(ReasonCode.INVALID_COMMAND, command))
            item = _Item(record, contract, digest, key)
            item.decision = GateDecision(ALLOWED, None, "operator-command", None, None)
            items.append(item)
        return items, decided

    def _rebuild(
        self, persons: set[str], resolution: Resolution
    ) -> tuple[dict[str, dict[str, Any]], set[str]]:
        """Profiles of the persons a batch changed, and the persons left with no events."""
        self.builder.reassign(resolution.moved)
        profiles = self.builder.build(persons - set(resolution.merged))
        gone = set(resolution.merged) | (persons - set(resolution.merged) - set(profiles))
        return profiles, gone

    def _check_quality(self, items: list[_Item]) -> QualityVerdict | None:
        """Run the quality suites over the contract-valid items; failing ones become rejections."""
        if self.quality is None:
            return None
        checked = [i for i in items if i.contract.ok]
        rows = [
            QualityRow(i.key, i.contract.kind, i.contract.event, i.contract.timestamp)  # type: ignore[arg-type]
            for i in checked
        ]
        verdict = self.quality.check(rows, self.conn)
        for item, reasons in zip(checked, verdict.reasons, strict=True):
            item.contract.reasons.extend(reasons)
        return verdict

    def _quality_record(self, items: list[_Item], verdict: QualityVerdict) -> tuple[bytes, bytes]:
        rejected = [
            (i.record.topic, i.contract.reasons[0].code.value) for i in items if not i.contract.ok
        ]
        positions = [(i.record.topic, i.record.partition, i.record.offset) for i in items]
        return batch_quality_record(positions, rejected, verdict)

    def _lineage_entry(self, item: _Item) -> dict[str, Any]:
        assert item.decision is not None
        decision, purpose, basis, consent_ref, jurisdiction = item.decision
        contract, record = item.contract, item.record
        event = contract.event
        assert event is not None
        return {
            "event_key": item.key,
            "kind": contract.kind,
            "event_ts": contract.timestamp,
            "source": {
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
            },
            "decision": decision,
            "purpose": purpose,
            "basis": basis,
            "consent_ref": consent_ref,
            "jurisdiction": jurisdiction,
            "policy_version": self.policy.version,
            "person_id": item.person_id,
            # Audits follow the record to the person it belongs to now (after a split).
            "record_id": item.record_id,
            "subjects": [_subject_hash(i) for i in contract.identifiers],
            "fields_masked": [],
            # For audits: the consent the event states, and the names (never the values) of
            # the attributes it states about its person.
            "statements": stated_consent(contract.kind, event),
            "attributes": _attribute_names(event),
        }

    def _record_outcomes(self, items: list[_Item], report: BatchReport) -> None:
        # Each item's outcome and its reason in one pass: rejected (the first reason's code)
        # when its contract failed, applied when consent allowed or recorded it, otherwise
        # withheld (the purpose it lacked).
        outcomes: list[str] = []
        reasons: list[str | None] = []
        for item in items:
            stated = item.contract.reasons
            if stated:
                outcomes.append(REJECTED)
                reasons.append(stated[0].code.value)
            elif item.decision.decision in (ALLOWED, CONSENT_RECORDED):  # type: ignore[union-attr]
                outcomes.append(APPLIED)
                reasons.append(None)
            else:
                outcomes.append(WITHHELD)
                reasons.append(item.decision.purpose)  # type: ignore[union-attr]
        report.outcomes.update(outcomes)
        if not items:
            return
        records = [item.record for item in items]
        rows = {
            "event_key": [item.key for item in items],
            "payload_hash": [item.payload_hash for item in items],
            "topic": [record.topic for record in records],
            "partition": [record.partition for record in records],
            "offset": [record.offset for record in records],
            "kind": [item.contract.kind for item in items],
            "outcome": outcomes,
            "reason": reasons,
            "person_id": [item.person_id for item in items],
        }
        # Column by column: the table pa.table makes from the lists, in half the time.
        self.stored_keys.insert(pa.table({k: pa.array(v) for k, v in rows.items()}))

    def _record_offsets(self, batch: Sequence[SourceRecord]) -> None:
        """Remember the next offset per partition, in the batch's transaction."""
        next_offsets: dict[tuple[str, int], int] = {}
        for record in batch:
            position = (record.topic, record.partition)
            if record.offset >= next_offsets.get(position, 0):
                next_offsets[position] = record.offset + 1
        if not next_offsets:
            return
        params = [value for (t, p), o in next_offsets.items() for value in (t, p, o)]
        # Once its partitions are stored, one UPDATE of their rows: the upsert below plans a
        # conflict check and its hash table, ~0.7 ms more a batch (1.1-1.3 against 1.7-2.3).
        whens = " ".join(['WHEN topic = ? AND "partition" = ? THEN ?::BIGINT'] * len(next_offsets))
        (updated,) = self.conn.execute(
            f"""UPDATE source_offsets SET next_offset = greatest(next_offset, CASE {whens} END)
                WHERE CASE {whens} END IS NOT NULL""",
            params + params,
        ).fetchone()
        if updated == len(next_offsets):
            return
        # One set-based upsert of its few rows as parameters: executemany costs a statement
        # per partition, an Arrow table registered and scanned ~0.5-1 ms more per batch.
        rows = ", ".join(["(?, ?::INTEGER, ?::BIGINT)"] * len(next_offsets))
        self.conn.execute(
            f"""INSERT INTO source_offsets VALUES {rows}
                ON CONFLICT (topic, "partition") DO UPDATE
                SET next_offset = greatest(source_offsets.next_offset, excluded.next_offset)""",
            params,
        )

    def _sealed(self, letter: OutRecord) -> OutRecord:
        """A dead letter whose original bytes are sealed for the subjects they name."""
        if self.keys is None or not letter.value:
            return letter
        return replace(letter, value=self.keys.seal_event(letter.value))

    def _outputs(self, items, entries, resolution, profiles, gone) -> list[OutRecord]:
        out: list[OutRecord] = []
        for item in items:
            if not item.contract.reasons:  # contract.ok, without a property call an event
                continue
            schema = (
                f"{item.contract.kind}/v{item.contract.version}"
                if item.contract.kind
                else "unknown"
            )
            out.append(
                self._sealed(
                    _dead_letter(
                        item.record, item.key, item.contract.reasons, schema, item.payload_hash
                    )
                )
            )
        # Serialised again with its chain fields: orjson does it in ~1.4 us, where putting
        # them into the ledger's stored text of the entry took ~3.2 us in Python (measured).
        for entry in entries:
            out.append(
                OutRecord(
                    topics.LINEAGE, entry.entry["event_key"].encode(), _json(entry.as_record())
                )
            )
        for link in resolution.log:
            owner = link["person_id"] or link["other_person_id"] or link["event_key"]
            out.append(OutRecord(topics.IDENTITY_LINKS, owner.encode(), _json(link)))
        for person_id in sorted(gone):  # merged away or left with nothing: a tombstone
            out.append(OutRecord(topics.PROFILES_CHANGELOG, person_id.encode(), None))
        if self.keys is not None:
            self.keys.prepare(profile_subjects(doc) for doc in profiles.values())
        for person_id in sorted(profiles):
            value = _json(profiles[person_id])
            if self.keys is not None:  # the document's PII is shredded with its subjects' keys
                value = self.keys.seal(value, profile_subjects(profiles[person_id]))
            out.append(OutRecord(topics.PROFILES_CHANGELOG, person_id.encode(), value))
        return out
