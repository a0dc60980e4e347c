"""The pipeline: every stage over one micro-batch, in one DuckDB transaction.

contract -> consent gate -> identity -> profile builder, then the outputs (dead letters,
lineage, identity links, profile changes) are handed to the engine's `emit`, and only
when emit returns is the state committed. A crash before the commit replays the batch;
event keys make the replay change nothing twice.

No Kafka or engine import lives here: Faust and Flink adapters call `process`.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from consent.gate import ALLOWED, CONSENT_RECORDED, ConsentGate, GateDecision
from consent.ledger import LineageLedger
from consent.policy import PurposePolicy, load_policy
from identity.graph import IdentityGraph, identifier_hash
from pipelines import topics
from profiles.builder import ProfileBuilder
from quality.reasons import ReasonCode
from schemas.contract import ContractResult, Reason, check_contract
from schemas.registry import SchemaRegistry, default_registry

APPLIED, REJECTED, WITHHELD = "applied", "rejected", "withheld"

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS outcomes (
    event_key VARCHAR PRIMARY KEY, payload_hash VARCHAR, topic VARCHAR, "partition" INTEGER,
    "offset" BIGINT, kind VARCHAR, outcome VARCHAR, reason VARCHAR, person_id VARCHAR
);
CREATE TABLE IF NOT EXISTS source_offsets (
    topic VARCHAR, "partition" INTEGER, next_offset BIGINT, PRIMARY KEY (topic, "partition")
);
"""


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


@dataclass
class _Item:
    record: SourceRecord
    contract: ContractResult
    payload_hash: str
    key: str
    decision: GateDecision | None = None
    person_id: str | None = None


def _hash(raw: bytes) -> str:
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def _json(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def source_position(record: SourceRecord) -> tuple[str, int, int]:
    """Where a record sits in its topic: the order batches are processed in."""
    return (record.topic, record.partition, record.offset)


def open_state(path: Path | str) -> duckdb.DuckDBPyConnection:
    """Open (creating if needed) a DuckDB state file with the session settings stages rely on."""
    conn = duckdb.connect(str(path))
    conn.execute("SET TimeZone = 'UTC'")
    return conn


class Pipeline:
    """The four stages over a micro-batch, with all their state in one DuckDB database."""

    def __init__(
        self,
        state_path: Path | str = ":memory:",
        policy: PurposePolicy | None = None,
        registry: SchemaRegistry | None = None,
    ) -> None:
        self.registry = registry or default_registry()
        self.policy = policy or load_policy(known_kinds=set(self.registry.kinds()))
        self.conn = open_state(state_path)
        self.conn.execute(SCHEMA_SQL)
        self.gate = ConsentGate(self.conn, self.policy)
        self.graph = IdentityGraph(self.conn)
        self.builder = ProfileBuilder(self.conn)
        self.ledger = LineageLedger(self.conn)

    def close(self) -> None:
        self.conn.close()

    def committed_offsets(self) -> dict[tuple[str, int], int]:
        """The next offset to consume per (topic, partition), as of the last commit."""
        rows = self.conn.execute('SELECT topic, "partition", next_offset FROM source_offsets')
        return {(t, p): o for t, p, o in rows.fetchall()}

    def process(
        self, batch: Sequence[SourceRecord], emit: Callable[[list[OutRecord]], None]
    ) -> BatchReport:
        """Run one micro-batch through every stage.

        In: consumed records in partition order, and `emit`, which must durably produce
        the outputs or raise. Out: a BatchReport. State commits only after emit returns.
        The batch is processed in (topic, partition, offset) order, so how an engine
        interleaved the partitions it consumed changes nothing (engine parity).
        """
        batch = sorted(batch, key=source_position)
        self.conn.execute("BEGIN TRANSACTION")
        try:
            report, outputs = self._process(batch)
            emit(outputs)
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        return report

    def _classify(self, batch: Sequence[SourceRecord], report: BatchReport) -> list[_Item]:
        items: list[_Item] = []
        for record in batch:
            raw = record.value or b""
            contract = check_contract(raw, self.registry)
            digest = _hash(raw)
            key = contract.event["messageId"] if contract.ok else f"raw:{digest}"
            items.append(_Item(record, contract, digest, key))
        keys = pa.table({"event_key": [i.key for i in items]})
        self.conn.register("_batch_keys", keys)
        try:
            seen = dict(
                self.conn.execute(
                    "SELECT event_key, payload_hash FROM outcomes JOIN _batch_keys USING (event_key)"
                ).fetchall()
            )
        finally:
            self.conn.unregister("_batch_keys")
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
                item.contract.reasons.append(
                    Reason(ReasonCode.DUPLICATE_EVENT_ID, f"messageId {item.key[:64]!r} reused")
                )
                item.key = raw_key
                seen[raw_key] = item.payload_hash
                fresh.append(item)
        return fresh

    def _known(self, key: str) -> bool:
        return bool(
            self.conn.execute("SELECT 1 FROM outcomes WHERE event_key = ?", [key]).fetchall()
        )

    def _process(self, batch: Sequence[SourceRecord]) -> tuple[BatchReport, list[OutRecord]]:
        report = BatchReport()
        items = self._classify(batch, report)
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
        linked = [i for i in valid if i.decision.decision == ALLOWED]  # type: ignore[union-attr]
        resolution = self.graph.resolve(
            [(i.key, i.contract.timestamp, i.contract.identifiers) for i in linked]
        )  # type: ignore[misc]
        for item, person_id in zip(linked, resolution.person_of, strict=True):
            item.person_id = person_id
        self.builder.repoint(resolution.merged)
        changed = self.builder.add(
            [
                (i.key, i.person_id, i.contract.kind, i.contract.event, i.contract.timestamp)
                for i in linked
            ]  # type: ignore[misc]
        )
        profiles = self.builder.build((changed | resolution.touched) - set(resolution.merged))
        entries = self.ledger.append([self._lineage_entry(i) for i in valid])
        self._record_outcomes(items, report)
        self._record_offsets(batch)
        report.profiles_changed = len(profiles)
        report.merges = len(resolution.merged)
        return report, self._outputs(items, entries, resolution, profiles)

    def _lineage_entry(self, item: _Item) -> dict[str, Any]:
        decision = item.decision
        assert decision is not None
        return {
            "event_key": item.key,
            "kind": item.contract.kind,
            "event_ts": item.contract.timestamp,
            "source": {
                "topic": item.record.topic,
                "partition": item.record.partition,
                "offset": item.record.offset,
            },
            "decision": decision.decision,
            "purpose": decision.purpose,
            "basis": decision.basis,
            "consent_ref": decision.consent_ref,
            "jurisdiction": decision.jurisdiction,
            "policy_version": self.policy.version,
            "person_id": item.person_id,
            "subjects": [identifier_hash(i) for i in item.contract.identifiers],
            "fields_masked": [],
        }

    @staticmethod
    def outcome_of(item: _Item) -> str:
        if not item.contract.ok:
            return REJECTED
        assert item.decision is not None
        return APPLIED if item.decision.decision in (ALLOWED, CONSENT_RECORDED) else WITHHELD

    def _record_outcomes(self, items: list[_Item], report: BatchReport) -> None:
        rows: dict[str, list[Any]] = {
            k: []
            for k in (
                "event_key",
                "payload_hash",
                "topic",
                "partition",
                "offset",
                "kind",
                "outcome",
                "reason",
                "person_id",
            )
        }
        for item in items:
            outcome = self.outcome_of(item)
            report.outcomes[outcome] += 1
            reason = (
                item.contract.reasons[0].code.value
                if item.contract.reasons
                else item.decision.purpose
                if outcome == WITHHELD
                else None  # type: ignore[union-attr]
            )
            for name, value in (
                ("event_key", item.key),
                ("payload_hash", item.payload_hash),
                ("topic", item.record.topic),
                ("partition", item.record.partition),
                ("offset", item.record.offset),
                ("kind", item.contract.kind),
                ("outcome", outcome),
                ("reason", reason),
                ("person_id", item.person_id),
            ):
                rows[name].append(value)
        if items:
            self.conn.register("_outcomes", pa.table(rows))
            try:
                self.conn.execute("INSERT INTO outcomes BY NAME SELECT * FROM _outcomes")
            finally:
                self.conn.unregister("_outcomes")

    def _record_offsets(self, batch: Sequence[SourceRecord]) -> None:
        """Remember the next offset per partition, in the batch's transaction."""
        next_offsets: dict[tuple[str, int], int] = {}
        for record in batch:
            position = (record.topic, record.partition)
            next_offsets[position] = max(next_offsets.get(position, 0), record.offset + 1)
        if not next_offsets:
            return
        self.conn.executemany(
            """INSERT INTO source_offsets VALUES (?, ?, ?) ON CONFLICT (topic, "partition")
               DO UPDATE SET next_offset = greatest(source_offsets.next_offset, excluded.next_offset)""",
            [(t, p, o) for (t, p), o in next_offsets.items()],
        )

    def _outputs(self, items, entries, resolution, profiles) -> list[OutRecord]:
        out: list[OutRecord] = []
        for item in items:
            if item.contract.ok:
                continue
            record, reasons = item.record, item.contract.reasons
            out.append(
                OutRecord(
                    topics.REJECTED,
                    item.key.encode(),
                    record.value or b"",
                    (
                        ("tessera.reason", reasons[0].code.value.encode()),
                        ("tessera.reasons", _json([r.as_dict() for r in reasons])),
                        ("tessera.event_key", item.key.encode()),
                        ("tessera.source.topic", record.topic.encode()),
                        ("tessera.source.partition", str(record.partition).encode()),
                        ("tessera.source.offset", str(record.offset).encode()),
                        (
                            "tessera.schema",
                            f"{item.contract.kind}/v{item.contract.version}".encode(),
                        ),
                    ),
                )
            )
        for entry in entries:
            out.append(
                OutRecord(
                    topics.LINEAGE, entry.entry["event_key"].encode(), _json(entry.as_record())
                )
            )
        for link in resolution.log:
            out.append(OutRecord(topics.IDENTITY_LINKS, link["person_id"].encode(), _json(link)))
        for loser in sorted(resolution.merged):
            out.append(OutRecord(topics.PROFILES_CHANGELOG, loser.encode(), None))
        for person_id in sorted(profiles):
            out.append(
                OutRecord(topics.PROFILES_CHANGELOG, person_id.encode(), _json(profiles[person_id]))
            )
        return out
