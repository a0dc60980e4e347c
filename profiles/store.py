"""The profile store: a DuckDB materialisation of Tessera's output topics that the API reads.

Every replica builds itself from the topics (profile changelog, lineage, dead letters,
identity links), so a new or wiped replica rebuilds by replaying them. Consumed offsets
are stored in the same transaction as the rows they produced.
"""

from __future__ import annotations

import gc
import logging
import struct
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from consent.keys import SubjectKeyStore, is_sealed
from consent.ledger import CHAIN_FIELDS, LedgerEntry, canonical_json, store_entries
from consent.ledger import SCHEMA_SQL as LEDGER_SCHEMA_SQL
from identity.normalise import Identifier, parse_identifier
from identity.resolver import unfreeze_at_exit
from pipelines import topics
from profiles.reads import DocumentCache, IdentifierIndex
from profiles.traits import TraitCatalog, at_read, load_traits

SCHEMA_SQL = """
-- Each changelog document compressed on its own (see _pack): a point read decompresses
-- one document, not the column segment a JSON column would share with its neighbours. The
-- column stores those LZ4 blocks as they are: a checkpoint's search of them for a dictionary
-- and symbol table would only find them incompressible.
CREATE TABLE IF NOT EXISTS profile_documents (
    person_id VARCHAR PRIMARY KEY, doc BLOB USING COMPRESSION uncompressed, version BIGINT
);
CREATE TABLE IF NOT EXISTS profile_identifiers (
    id_type VARCHAR, id_value VARCHAR, person_id VARCHAR, PRIMARY KEY (id_type, id_value)
);
CREATE TABLE IF NOT EXISTS person_aliases (old_id VARCHAR PRIMARY KEY, person_id VARCHAR);
CREATE TABLE IF NOT EXISTS event_outcomes (
    event_key VARCHAR PRIMARY KEY, outcome VARCHAR, reason VARCHAR, topic VARCHAR, kind VARCHAR
);
CREATE TABLE IF NOT EXISTS identity_events (
    link_id VARCHAR PRIMARY KEY, kind VARCHAR, person_id VARCHAR, other_person_id VARCHAR,
    rule VARCHAR, event_key VARCHAR, ts VARCHAR, detail JSON
);
CREATE TABLE IF NOT EXISTS identity_membership (record_id VARCHAR PRIMARY KEY, person_id VARCHAR);
CREATE TABLE IF NOT EXISTS quality_rejections (
    event_key VARCHAR PRIMARY KEY, topic VARCHAR, reason VARCHAR, rejected_at TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS quality_batches (batch VARCHAR PRIMARY KEY, checked_at TIMESTAMPTZ, doc JSON);
CREATE TABLE IF NOT EXISTS erasures (request_id VARCHAR PRIMARY KEY, certificate JSON);
CREATE TABLE IF NOT EXISTS segment_members (
    segment VARCHAR, person_id VARCHAR, since TIMESTAMPTZ, PRIMARY KEY (segment, person_id)
);
CREATE TABLE IF NOT EXISTS replica_offsets (
    topic VARCHAR, "partition" INTEGER, next_offset BIGINT, PRIMARY KEY (topic, "partition")
);
"""

log = logging.getLogger("tessera.replica")

# WAL between checkpoints: a larger one folds more applies per checkpoint (less CPU) and
# keeps more rows in memory until it, and a restart replays up to that much.
CHECKPOINT_WAL = "64MB"

FOLLOWED_TOPICS = (
    topics.PROFILES_CHANGELOG,
    topics.LINEAGE,
    topics.REJECTED,
    topics.IDENTITY_LINKS,
    topics.QUALITY_REPORTS,
    *topics.PRIVACY_OUTPUT_TOPICS,
    topics.SEGMENT_CHANGES,
)
_HISTORY_KINDS = ("person_created", "merge", "split", "conflict", "link_rejected")
QUALITY_BUCKETS = {"minute", "hour", "day"}
_DECISION_OUTCOME = {"allowed": "applied", "consent_recorded": "applied", "withheld": "withheld"}


@dataclass(frozen=True)
class ConsumedRecord:
    """A message the replica consumed from one of the followed topics."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


def _header(record: ConsumedRecord, name: str) -> str | None:
    for key, value in record.headers:
        if key == name:
            return value.decode("utf-8", "replace")
    return None


def _timestamp(text: str | None) -> datetime | None:
    """An ISO time from a header or report, or None when absent or unreadable."""
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# A stored document: _LZ4 + its length (4 bytes, little-endian) + an LZ4 block. LZ4 packs
# a ~7 KB document in ~3 us against zlib's (level 1) ~21 us, and unpacks it in ~1.5 us
# against ~9, for ~20% more bytes. Stores written before hold zlib streams, whose first
# byte is 0x78 (zlib.compress's header): both are read.
_LZ4 = b"L"
_LZ4_CODEC = pa.Codec("lz4_raw")
_LENGTH = struct.Struct("<I")


def _pack(document: bytes) -> bytes:
    """A changelog document (JSON bytes) as stored."""
    return _LZ4 + _LENGTH.pack(len(document)) + _LZ4_CODEC.compress(document, asbytes=True)


def _unpack(blob: bytes) -> dict[str, Any]:
    """A stored (compressed) document as read."""
    if blob[:1] != _LZ4:
        return orjson.loads(zlib.decompress(blob))
    (length,) = _LENGTH.unpack_from(blob, 1)
    return orjson.loads(
        _LZ4_CODEC.decompress(memoryview(blob)[5:], decompressed_size=length, asbytes=True)
    )


# A changelog document is orjson's output with sorted keys: "identifiers", "merged_from",
# "person_id" and "version" come before "views", which is nearly all of its bytes.
_VIEWS = b',"views":'


def _head(document: bytes) -> tuple[int, dict[str, list[str]]]:
    """A changelog document's version (0 when it has none) and identifiers (by type).

    Only the members before "views" are parsed when they hold both (the views are ~97% of
    a document); otherwise, or if that part does not parse, the whole document."""
    end = document.find(_VIEWS)
    head: Any = None
    if end > 0:
        try:
            head = orjson.loads(document[:end] + b"}")
        except orjson.JSONDecodeError:
            head = None
    if not isinstance(head, dict) or "identifiers" not in head or "version" not in head:
        head = orjson.loads(document)
    version = head.get("version")
    return (0 if version is None else int(version)), head.get("identifiers") or {}


class ProfileStore:
    """One replica's DuckDB file: written by its follower, read by the API, in one process."""

    def __init__(
        self,
        path: Path | str,
        read_only: bool = False,
        keys: SubjectKeyStore | None = None,
        traits: TraitCatalog | None = None,
        cache_entries: int = 50_000,
        identifier_entries: int = 20_000_000,
    ) -> None:
        # Read-only: another process's file opened for audits (it must exist and not be in use).
        self.keys = keys  # opens sealed changelog documents; an erased subject's stay shut
        self.traits = traits or load_traits()
        # Recently read documents (about 1 KB each, compressed) and the API's answers rendered
        # from them: a write replaces the person's document and drops their answers.
        self.cache = DocumentCache(cache_entries, answer_capacity=cache_entries)
        # Which person holds each identifier, once `warm` has loaded it (at most
        # `identifier_entries`, about 20 bytes each); until then lookups query the table.
        self.identifiers = IdentifierIndex(identifier_entries)
        self.frozen = False  # warmed with the collector's long-lived objects frozen
        self.conn = duckdb.connect(str(path), read_only=read_only)
        self.conn.execute("SET TimeZone = 'UTC'")
        if not read_only:
            # The follower's applies are a dozen statements over a few thousand rows each:
            # as in the worker (pipelines/pipeline.py), one DuckDB thread, and a checkpoint
            # per CHECKPOINT_WAL of WAL rather than DuckDB's 16 MB (at 5,000 events/s, one
            # every few seconds, each merging the row groups the applies since the last one
            # started). See BENCHMARKS.md, *The replica's apply*. Reads share the setting: on a
            # store of 100,000 events /stats and /quality took the same with one thread as
            # with two (6 and 5 ms of CPU and of wall time).
            self.conn.execute(f"SET checkpoint_threshold = '{CHECKPOINT_WAL}'")
            self.conn.execute("SET threads = 1")
            self.conn.execute(SCHEMA_SQL)
            # The lineage ledger as published, hashes included, so audits verify the chain here.
            # Its entries (~1 KB of JSON each, most of the store's bytes) are zstd (the
            # ledger's schema): a checkpoint packs them with less CPU than DuckDB's own choice
            # for text, which analyses every segment for a dictionary and symbol table, in
            # half the blocks (97,500 entries: 0.97-1.09 CPU-s against 1.28-1.29 written in
            # applies of 1,100, 18 MB against 38 MB). A store created before keeps its column.
            self.conn.execute(LEDGER_SCHEMA_SQL)
        self._write_lock = threading.Lock()
        # Point reads keep one cursor per thread: opening one costs as much as a lookup.
        self._cursors = threading.local()
        self._opened: list[duckdb.DuckDBPyConnection] = []
        self._opened_lock = threading.Lock()  # not the write lock: a read must not wait for a write

    def close(self) -> None:
        for cur in self._opened:
            cur.close()
        self.conn.close()

    def reader(self) -> duckdb.DuckDBPyConnection:
        """A cursor for one reading thread (DuckDB connections are not shared across threads)."""
        return self.conn.cursor()

    def _point_reader(self) -> duckdb.DuckDBPyConnection:
        """This thread's cursor for point reads, opened on its first use."""
        cur = getattr(self._cursors, "cur", None)
        if cur is None:
            cur = self._cursors.cur = self.conn.cursor()
            with self._opened_lock:
                self._opened.append(cur)
        return cur

    # -- writing -----------------------------------------------------------------------------

    def offsets(self) -> dict[tuple[str, int], int]:
        rows = self.conn.cursor().execute(
            'SELECT topic, "partition", next_offset FROM replica_offsets'
        )
        return {(t, p): o for t, p, o in rows.fetchall()}

    def apply(self, records: Sequence[ConsumedRecord]) -> None:
        """Materialise consumed records and their offsets in one transaction (idempotent)."""
        if not records:
            return
        profiles: dict[str, bytes | None] = {}
        outcomes: dict[str, tuple[str, str | None, str | None, str | None]] = {}
        links: list[dict[str, Any]] = []
        rejections: dict[str, tuple[str | None, str | None, str | None]] = {}
        quality_batches: dict[str, tuple[str | None, str]] = {}
        certificates: list[dict[str, Any]] = []
        # The latest change per (segment, person): entered (with its time) or not.
        memberships: dict[tuple[str, str], tuple[bool, str | None]] = {}
        positions: dict[tuple[str, int], int] = {}
        ledger: dict[int, LedgerEntry] = {}  # by sequence number
        texts: dict[int, str] = {}  # each entry's canonical JSON, as the ledger stores it
        for record in records:
            position = (record.topic, record.partition)
            positions[position] = max(positions.get(position, 0), record.offset + 1)
            key = (record.key or b"").decode("utf-8", "replace")
            if record.topic == topics.PROFILES_CHANGELOG:
                # Latest per key wins, as compacted; kept in the order of each key's latest
                # record (an identifier two documents list goes to the later one).
                profiles.pop(key, None)
                profiles[key] = self._open(record.value)
            elif record.topic == topics.ERASURES and record.value:
                certificates.append(orjson.loads(record.value))
            elif record.topic == topics.LINEAGE and record.value:
                entry = orjson.loads(record.value)
                if "hash" in entry:
                    # `LedgerEntry.from_record` without its copy: the chain fields taken
                    # out of the decoded record leave the entry; its canonical text kept.
                    seq, prev_hash, digest = (entry.pop(f) for f in CHAIN_FIELDS)
                    chained = LedgerEntry(int(seq), entry, str(prev_hash), str(digest))
                    ledger[chained.seq] = chained  # re-delivered in this chunk: once
                    texts[chained.seq] = canonical_json(entry).decode()
                outcome = _DECISION_OUTCOME.get(entry.get("decision"), "applied")
                reason = entry.get("purpose") if outcome == "withheld" else None
                source = (entry.get("source") or {}).get("topic")
                outcomes[entry["event_key"]] = (outcome, reason, source, entry.get("kind"))
            elif record.topic == topics.REJECTED:
                outcomes[key] = (
                    "rejected",
                    _header(record, "tessera.reason"),
                    _header(record, "tessera.source.topic"),
                    None,
                )
                rejections[key] = (
                    _header(record, "tessera.source.topic"),
                    _header(record, "tessera.reason"),
                    _header(record, "tessera.rejected_at"),
                )
            elif record.topic == topics.QUALITY_REPORTS and record.value:
                report = orjson.loads(record.value)
                quality_batches[key] = (report.get("checked_at"), record.value.decode())
            elif record.topic == topics.IDENTITY_LINKS and record.value:
                links.append(orjson.loads(record.value))
            elif record.topic == topics.SEGMENT_CHANGES and record.value:
                change = orjson.loads(record.value)
                memberships[(change["segment"], change["person_id"])] = (
                    change.get("change") == "entered",
                    change.get("at"),
                )

        def write(cur: duckdb.DuckDBPyConnection, fresh: bool) -> tuple[Any, ...]:
            """The apply's statements; `fresh`: rows keyed by sequence, event, link or batch
            are inserted, not upserted (an insert raises if the key is stored)."""
            packed, held, now_held = self._apply_profiles(cur, profiles)
            store_entries(cur, list(ledger.values()), replace=not fresh, texts=list(texts.values()))
            if outcomes:
                self._upsert(
                    cur,
                    "event_outcomes",
                    {
                        "event_key": list(outcomes),
                        "outcome": [o[0] for o in outcomes.values()],
                        "reason": [o[1] for o in outcomes.values()],
                        "topic": [o[2] for o in outcomes.values()],
                        "kind": [o[3] for o in outcomes.values()],
                    },
                    insert=fresh,
                )
            if links:
                self._upsert(
                    cur,
                    "identity_events",
                    {
                        name: [
                            str(link[name]) if link.get(name) is not None else None
                            for link in links
                        ]
                        for name in (
                            "link_id",
                            "kind",
                            "person_id",
                            "other_person_id",
                            "rule",
                            "event_key",
                            "ts",
                        )
                    }
                    | {
                        "detail": [
                            orjson.dumps(link.get("detail") or {}).decode() for link in links
                        ]
                    },
                    insert=fresh,
                )
                self._apply_membership(cur, links)
                merges = [link for link in links if link["kind"] == "merge"]
                if merges:
                    self._upsert(
                        cur,
                        "person_aliases",
                        {
                            "old_id": [m["other_person_id"] for m in merges],
                            "person_id": [m["person_id"] for m in merges],
                        },
                    )
            if rejections:
                self._upsert(
                    cur,
                    "quality_rejections",
                    {
                        "event_key": list(rejections),
                        "topic": [r[0] for r in rejections.values()],
                        "reason": [r[1] for r in rejections.values()],
                        "rejected_at": [_timestamp(r[2]) for r in rejections.values()],
                    },
                    insert=fresh,
                )
            if quality_batches:
                self._upsert(
                    cur,
                    "quality_batches",
                    {
                        "batch": list(quality_batches),
                        "checked_at": [_timestamp(b[0]) for b in quality_batches.values()],
                        "doc": [b[1] for b in quality_batches.values()],
                    },
                    insert=fresh,
                )
            erased_held: list[tuple[str, str]] = []
            for certificate in certificates:
                erased_held += self._apply_erasure(cur, certificate)
            self._apply_memberships(cur, memberships)
            # A few rows: literal parameters, not an Arrow table (1.4 ms a statement).
            cur.execute(
                "INSERT OR REPLACE INTO replica_offsets VALUES "
                + ", ".join(["(?, ?, ?)"] * len(positions)),
                [v for (topic, part), offset in positions.items() for v in (topic, part, offset)],
            )
            return packed, held, now_held, erased_held

        with self._write_lock:
            cur = self.conn.cursor()
            # Ledger entries, outcomes, dead letters, identity events and quality reports
            # arrive once each unless published again (a worker that crashed after
            # publishing a batch and before committing it processes the batch again, and
            # its second outputs replace the first): plain inserts first (an upsert probes
            # the key and writes the row over; ~20% of those tables' cost), and, when one
            # of their keys is stored already, the apply again as upserts. Either way the
            # same rows are stored.
            for fresh in (True, False):
                cur.execute("BEGIN TRANSACTION")
                try:
                    packed, held, now_held, erased_held = write(cur, fresh)
                    cur.execute("COMMIT")
                    break
                except duckdb.ConstraintException:
                    cur.execute("ROLLBACK")
                    if not fresh:
                        raise
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
            # After the commit, so no read of the old documents can be cached again; in
            # commit order, the profiles' identifiers before the erasures'.
            self.identifiers.changed(held, now_held)
            self.identifiers.changed(erased_held, ())
            erased = [p for c in certificates for p in c.get("persons_erased") or []]
            self.cache.invalidate(profiles, packed)
            if erased:  # after the profiles: an erased person's new document goes too
                self.cache.invalidate(erased)

    def _open(self, value: bytes | None) -> bytes | None:
        """A changelog value as JSON bytes; a sealed one whose key is gone reads as deleted."""
        if not is_sealed(value):
            return value
        if self.keys is None:
            log.warning("a sealed profile arrived and no key store is set (TESSERA_KEY_STORE)")
            return None
        return self.keys.open(value)  # type: ignore[arg-type]

    def _apply_erasure(
        self, cur: duckdb.DuckDBPyConnection, certificate: dict[str, Any]
    ) -> list[tuple[str, str]]:
        """Delete what this replica derived about the erased persons; keep the certificate
        with this replica's counts added. Out: the identifiers (type, value) they held."""
        persons = pa.table(
            {"person_id": pa.array(certificate.get("persons_erased") or [], pa.string())}
        )
        cur.register("_erased_persons", persons)
        counts: dict[str, int] = {}
        held: list[tuple[str, str]] = []
        try:
            for table, where in (
                ("profile_documents", "person_id IN (SELECT person_id FROM _erased_persons)"),
                ("segment_members", "person_id IN (SELECT person_id FROM _erased_persons)"),
                ("profile_identifiers", "person_id IN (SELECT person_id FROM _erased_persons)"),
                (
                    "person_aliases",
                    "person_id IN (SELECT person_id FROM _erased_persons) "
                    "OR old_id IN (SELECT person_id FROM _erased_persons)",
                ),
                ("identity_membership", "person_id IN (SELECT person_id FROM _erased_persons)"),
                (
                    "identity_events",
                    "person_id IN (SELECT person_id FROM _erased_persons) "
                    "OR other_person_id IN (SELECT person_id FROM _erased_persons)",
                ),
            ):
                if table == "profile_identifiers":
                    held = cur.execute(
                        f"DELETE FROM {table} WHERE {where} RETURNING id_type, id_value"
                    ).fetchall()
                    counts[table] = len(held)
                    continue
                counts[table] = cur.execute(f"DELETE FROM {table} WHERE {where}").fetchone()[0]
        finally:
            cur.unregister("_erased_persons")
        erased = dict(certificate.get("erased") or {})
        erased["replica"] = counts
        self._upsert(
            cur,
            "erasures",
            {
                "request_id": [certificate["request_id"]],
                "certificate": [orjson.dumps({**certificate, "erased": erased}).decode()],
            },
        )
        return held

    def erasure(self, request_id: str) -> dict[str, Any] | None:
        """The certificate of an erasure request, once the worker has carried it out."""
        rows = (
            self.reader()
            .execute("SELECT certificate FROM erasures WHERE request_id = ?", [request_id])
            .fetchall()
        )
        return orjson.loads(rows[0][0]) if rows else None

    @staticmethod
    def _upsert(
        cur: duckdb.DuckDBPyConnection,
        table: str,
        columns: dict[str, list[Any]],
        insert: bool = False,
    ) -> None:
        """Write rows by key, replacing stored ones; `insert`: a plain insert (a key stored
        already raises duckdb.ConstraintException)."""
        cur.register("_replica_rows", pa.table(columns))
        verb = "INSERT" if insert else "INSERT OR REPLACE"
        cur.execute(f"{verb} INTO {table} BY NAME SELECT * FROM _replica_rows")
        # Not after a failure: the transaction is aborted (an unregister would raise in place
        # of the error) and its rollback drops the view.
        cur.unregister("_replica_rows")

    def _apply_memberships(
        self,
        cur: duckdb.DuckDBPyConnection,
        memberships: dict[tuple[str, str], tuple[bool, str | None]],
    ) -> None:
        """Segment entries and exits: an exit deletes the member, an entry (re)adds it."""
        if not memberships:
            return
        cur.register(
            "_replica_segments",
            pa.table(
                {
                    "segment": [s for s, _ in memberships],
                    "person_id": [p for _, p in memberships],
                    "since": [_timestamp(at) for _, at in memberships.values()],
                    "entered": [entered for entered, _ in memberships.values()],
                }
            ),
        )
        try:
            cur.execute(
                """DELETE FROM segment_members USING _replica_segments c
                   WHERE segment_members.segment = c.segment
                     AND segment_members.person_id = c.person_id"""
            )
            cur.execute(
                """INSERT INTO segment_members SELECT segment, person_id, since
                   FROM _replica_segments WHERE entered ORDER BY segment, person_id"""
            )
        finally:
            cur.unregister("_replica_segments")

    def _apply_membership(
        self, cur: duckdb.DuckDBPyConnection, links: list[dict[str, Any]]
    ) -> None:
        """Follow which person each identity record belongs to, in link-event order.

        One write for the apply's merges and one for its assignments, in place of an update
        (a scan of the table) per merge: a merge moves the records assigned before it in
        this apply in memory, and the stored ones by the composed renames, applied before
        the assignments (which come later in link-event order, or were moved already).
        """
        assign: dict[str, str] = {}
        renamed: dict[str, str] = {}  # a person whose stored records now belong to another
        for link in links:
            detail, person = link.get("detail") or {}, link.get("person_id")
            if link["kind"] == "person_created" and detail.get("record_id"):
                assign[detail["record_id"]] = person
            elif link["kind"] == "record_linked":
                assign[detail["record_l"]] = assign[detail["record_r"]] = person
            elif link["kind"] == "merge":
                gone = link["other_person_id"]
                for record, holder in assign.items():
                    if holder == gone:
                        assign[record] = person
                for stored, holder in renamed.items():
                    if holder == gone:
                        renamed[stored] = person
                renamed.setdefault(gone, person)
            elif link["kind"] == "split":
                for record in detail.get("records") or []:
                    assign[record] = link["other_person_id"]
        renamed = {stored: holder for stored, holder in renamed.items() if stored != holder}
        if renamed:
            cur.register(
                "_replica_renamed",
                pa.table({"old_id": list(renamed), "person_id": list(renamed.values())}),
            )
            try:
                cur.execute(
                    """UPDATE identity_membership SET person_id = r.person_id
                       FROM _replica_renamed r WHERE identity_membership.person_id = r.old_id"""
                )
            finally:
                cur.unregister("_replica_renamed")
        if assign:
            self._upsert(
                cur,
                "identity_membership",
                {"record_id": list(assign), "person_id": list(assign.values())},
            )

    def explain(self, person_id: str) -> dict[str, Any] | None:
        """Why a person is one person: its records, the links holding them, its history."""
        cur = self.reader()
        records = sorted(self.records_held({person_id}))
        if not records:
            alias = cur.execute(
                "SELECT person_id FROM person_aliases WHERE old_id = ?", [person_id]
            ).fetchall()
            return self.explain(alias[0][0]) if alias and alias[0][0] != person_id else None
        members = set(records)
        rejected = {
            frozenset((d["record_l"], d["record_r"]))
            for (raw,) in cur.execute(
                "SELECT detail FROM identity_events WHERE kind = 'link_rejected'"
            ).fetchall()
            for d in [orjson.loads(raw)]
            if d.get("record_l")
        }
        links, history = [], []
        for link_id, kind, person, other, rule, event_key, ts, raw in cur.execute(
            """SELECT link_id, kind, person_id, other_person_id, rule, event_key, ts, detail
               FROM identity_events
               WHERE kind IN ('record_linked', 'merge') OR person_id = ? OR other_person_id = ?
               ORDER BY ts, link_id""",
            [person_id, person_id],
        ).fetchall():
            detail = orjson.loads(raw) if raw else {}
            pair = (detail.get("record_l"), detail.get("record_r"))
            if (
                kind in ("record_linked", "merge")
                and pair[0] in members
                and pair[1] in members
                and frozenset(pair) not in rejected
            ):
                links.append(
                    {
                        "link_id": link_id,
                        "kind": kind,
                        "record_l": pair[0],
                        "record_r": pair[1],
                        "rule": rule,
                        "match_weight": detail.get("match_weight"),
                        "match_probability": detail.get("match_probability"),
                        "comparisons": detail.get("comparisons"),
                        "event_key": event_key,
                        "ts": ts,
                    }
                )
            if person_id in (person, other) and kind in _HISTORY_KINDS:
                history.append(
                    {
                        "link_id": link_id,
                        "kind": kind,
                        "person_id": person,
                        "other_person_id": other,
                        "rule": rule,
                        "ts": ts,
                    }
                )
        return {"person_id": person_id, "records": records, "links": links, "history": history}

    def _apply_profiles(
        self, cur: duckdb.DuckDBPyConnection, profiles: dict[str, bytes | None]
    ) -> tuple[dict[str, bytes], list[tuple[str, str]], list[tuple[str, str, str]]]:
        """Replace each changed person's document and identifier index (None: a tombstone).

        The documents as one Arrow batch sorted by person id, each with its version; the
        identifiers they list against those the persons hold, compared in DuckDB. Out: the
        stored (compressed) documents by person id; while the in-memory identifier index
        follows writes, the identifiers (type, value) the persons no longer hold and those
        (type, value, person id) newly held, as the table changed.
        """
        if not profiles:
            return {}, [], []
        packed: dict[str, bytes] = {}
        versions: list[int | None] = []
        # Who each listed identifier goes to: one two changed documents list goes to the
        # later document, as it does when the two fall into different applies, so the
        # holder does not depend on how records fall into applies.
        listed: dict[tuple[str, str], str] = {}
        for person, doc in profiles.items():
            if doc is None:
                versions.append(None)
                continue
            packed[person] = _pack(doc)
            version, identifiers = _head(doc)
            versions.append(version)
            for id_type, values in identifiers.items():
                for value in values or ():
                    listed[(id_type, value)] = person
        changed = pa.table(
            {
                "person_id": list(profiles),
                "packed": [packed.get(p) for p in profiles],
                "version": pa.array(versions, pa.int64()),
            }
        ).sort_by("person_id")
        now_held = pa.table(
            {
                "id_type": [t for t, _ in listed],
                "id_value": [v for _, v in listed],
                "person_id": list(listed.values()),
            }
        )
        # RETURNING only when the index needs the rows: loading a store skips their cost.
        returning = self.identifiers.recording
        cur.register("_replica_changed", changed)
        cur.register("_replica_listed", now_held)
        try:
            cur.execute(
                "DELETE FROM profile_documents "
                "WHERE person_id IN (SELECT person_id FROM _replica_changed)"
            )
            cur.execute(
                """INSERT INTO profile_documents SELECT person_id, packed, version
                   FROM _replica_changed WHERE packed IS NOT NULL"""
            )
            # Only the identifiers that changed are written: a profile's change seldom
            # changes its identifiers, and deleting and inserting every one again cost
            # more than the rest of its document's apply. What the persons hold now
            # (one scan, as the delete of them all was) against what their documents
            # list, compared here rather than fetched whole (every identifier of every
            # changed person) and compared in Python.
            diff = cur.execute(
                """WITH held AS (
                       SELECT id_type, id_value, person_id FROM profile_identifiers
                       WHERE person_id IN (SELECT person_id FROM _replica_changed))
                   SELECT false, * FROM (FROM held EXCEPT FROM _replica_listed)
                   UNION ALL
                   SELECT true, * FROM (FROM _replica_listed EXCEPT FROM held)
                   ORDER BY 1, 2, 3, 4"""
            ).fetchall()
        finally:
            cur.unregister("_replica_listed")
            cur.unregister("_replica_changed")
        removed = [(t, v, p) for new, t, v, p in diff if not new]
        added = [(t, v, p) for new, t, v, p in diff if new]
        # Held no more by anyone: deleted. One another person takes is replaced below.
        taken = {(t, v) for t, v, _ in added}
        gone = [row for row in removed if (row[0], row[1]) not in taken]
        if gone:
            self._rows(
                cur,
                "DELETE FROM profile_identifiers USING _replica_rows r "
                "WHERE profile_identifiers.id_type = r.id_type "
                "AND profile_identifiers.id_value = r.id_value "
                "AND profile_identifiers.person_id = r.person_id",
                gone,
            )
        if added:  # in key order, as the index is
            self._rows(
                cur,
                "INSERT OR REPLACE INTO profile_identifiers SELECT * FROM _replica_rows",
                added,
            )
        # For the in-memory index, as the table changed (the identifiers a person keeps
        # are in neither list: the index holds them already).
        held = [(id_type, value) for id_type, value, _ in removed] if returning else []
        return packed, held, added if returning else []

    @staticmethod
    def _rows(cur: duckdb.DuckDBPyConnection, sql: str, rows: list[tuple[str, str, str]]) -> None:
        """Run `sql` over identifier rows (type, value, person id) as table _replica_rows."""
        cur.register(
            "_replica_rows",
            pa.table(
                {
                    "id_type": [r[0] for r in rows],
                    "id_value": [r[1] for r in rows],
                    "person_id": [r[2] for r in rows],
                }
            ),
        )
        try:
            cur.execute(sql)
        finally:
            cur.unregister("_replica_rows")

    # -- reading -----------------------------------------------------------------------------

    def get(
        self, person_id: str, purpose: str | None = None, now: datetime | None = None
    ) -> dict[str, Any] | None:
        """The profile of `person_id` as read for `purpose`, following merges to the survivor.

        With a purpose: only that purpose's view (attributes from events the person
        currently consents to for it), or None when there is none, with windowed traits
        evaluated at `now` (default: the wall clock). Without: the whole changelog
        document (all views, daily buckets included), for administrators and audits.
        """
        doc = self.documents([person_id]).get(person_id)
        if doc is None or purpose is None:
            return doc
        return self.view_of(doc, purpose, now)

    def view_of(
        self, doc: dict[str, Any], purpose: str, now: datetime | None = None
    ) -> dict[str, Any] | None:
        """One purpose's view of a changelog document, its computed traits as of `now`."""
        view = (doc.get("views") or {}).get(purpose)
        if view is None:
            return None
        computed = at_read(
            self.traits,
            view.get("computed") or {},
            view.get("windows") or {},
            now or datetime.now(UTC),
        )
        return {
            "person_id": doc["person_id"],
            "purpose": purpose,
            "version": doc.get("version"),
            "merged_from": doc.get("merged_from", []),
            "identifiers": view.get("identifiers") or {},
            "traits": view.get("traits") or {},
            "computed": computed,
        }

    def cached_document(self, person_id: str) -> dict[str, Any] | None:
        """The whole changelog document of `person_id` if the cache holds it, else None
        (it may still be stored, or merged into another person: `documents` says)."""
        blob = self.cache.get(person_id)
        return None if blob is None else _unpack(blob)

    def document(self, person_id: str) -> dict[str, Any] | None:
        """The whole changelog document of a person (all views), following merges."""
        return self.documents([person_id]).get(person_id)

    def person_holding(self, identifier: Identifier) -> str | None:
        """The person whose profile holds a normalised identifier, if any (from memory
        once `warm` has loaded the identifier index)."""
        if self.identifiers.loaded:
            return self.identifiers.person(identifier.type, identifier.value)
        rows = (
            self._point_reader()
            .execute(
                "SELECT person_id FROM profile_identifiers WHERE id_type = ? AND id_value = ?",
                [identifier.type, identifier.value],
            )
            .fetchall()
        )
        return rows[0][0] if rows else None

    def persons_holding(self, keys: Sequence[str]) -> dict[str, str | None]:
        """The persons holding normalised identifiers written `type:value`, by identifier."""
        found: dict[str, str | None] = {}
        for key in keys:
            id_type, _, value = key.partition(":")
            found[key] = self.person_holding(Identifier(id_type, value))
        return found

    def identity_history(self, person_ids: set[str]) -> list[dict[str, Any]]:
        """Identity events (person created, merges, splits, conflicts, rejected links) that
        name any of `person_ids`, oldest first; no identifier values, only ids and rules."""
        if not person_ids:
            return []
        rows = (
            self.reader()
            .execute(
                """SELECT link_id, kind, person_id, other_person_id, rule, event_key, ts
                   FROM identity_events
                   WHERE kind IN (SELECT unnest(?)) AND (person_id IN (SELECT unnest(?))
                         OR other_person_id IN (SELECT unnest(?)))
                   ORDER BY ts, link_id""",
                [list(_HISTORY_KINDS), sorted(person_ids), sorted(person_ids)],
            )
            .fetchall()
        )
        names = ("link_id", "kind", "person_id", "other_person_id", "rule", "event_key", "ts")
        return [dict(zip(names, row, strict=True)) for row in rows]

    def records_held(self, person_ids: set[str]) -> set[str]:
        """The identity records that belong to any of `person_ids` now."""
        rows = (
            self.reader()
            .execute(
                "SELECT record_id FROM identity_membership WHERE person_id IN (SELECT unnest(?))",
                [sorted(person_ids)],
            )
            .fetchall()
        )
        return {record for (record,) in rows}

    def record_owners(self, record_ids: set[str]) -> dict[str, str]:
        """The person each of `record_ids` belongs to now (unknown or erased: left out)."""
        rows = (
            self.reader()
            .execute(
                "SELECT record_id, person_id FROM identity_membership "
                "WHERE record_id IN (SELECT unnest(?))",
                [sorted(record_ids)],
            )
            .fetchall()
        )
        return dict(rows)

    def get_many(
        self, person_ids: Sequence[str], purpose: str, now: datetime | None = None
    ) -> dict[str, dict[str, Any] | None]:
        """Several profiles read for `purpose`, by requested id (one query; merges followed)."""
        now = now or datetime.now(UTC)
        return {
            person: self.view_of(doc, purpose, now) if doc else None
            for person, doc in self.documents(person_ids).items()
        }

    def documents(self, person_ids: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        """Whole changelog documents by requested person id, merges followed (None: no
        such person); ids that are not printable are left out.

        Documents read recently come from the cache; the rest from one query probing the
        primary-key index.
        """
        wanted = [p for p in dict.fromkeys(person_ids) if p.isprintable()]
        blobs: dict[str, bytes] = {}
        for person in wanted:
            blob = self.cache.get(person)
            if blob is not None:
                blobs[person] = blob
        missing = [p for p in wanted if p not in blobs]
        if missing:
            self.cache.missed(len(missing))
            generation = self.cache.generation
            # A literal IN list lets DuckDB probe the primary-key index; a list parameter (or
            # a joined table) scans every stored document (4 s against 50 ms at 300,000 rows).
            listed = ", ".join("'" + p.replace("'", "''") + "'" for p in missing)
            rows = (
                self._point_reader()
                .execute(
                    f"SELECT person_id, doc FROM profile_documents WHERE person_id IN ({listed})"
                )
                .fetchall()
            )
            self.cache.put(rows, generation)  # only direct hits: a merge's alias is not a key
            blobs.update(rows)
        return {
            person: _unpack(blobs[person]) if person in blobs else self._merged_into(person)
            for person in wanted
        }

    def warm(self, chunk: int = 50_000, attempts: int = 3, freeze: bool = True) -> int:
        """Fill the document cache from the stored documents until it is full, and load
        the identifier index; out: how many documents the cache holds.

        A store that fits in the cache then answers every lookup from memory: a DuckDB
        query costs far more CPU than the rest of a lookup. What one query read is kept
        only while no write has committed since it began; after a write the scan starts
        again (at most `attempts` times: under a steady stream of writes, reads fill the
        cache instead).

        `freeze`: then move every object alive to the collector's permanent generation
        (`gc.freeze`). A full collection walks every tracked container, and the cache's
        million-entry dict alone takes it a quarter of a second with the event loop
        stalled; the warm state is long-lived by design, so nothing is lost.
        """
        held = self._warm_documents(chunk, attempts)
        self.load_identifiers()
        if freeze:
            self.freeze()
        return held

    def freeze(self) -> None:
        """Move every object alive to the collector's permanent generation (the API calls
        it again once it serves, for what it built after warming)."""
        gc.collect()
        gc.freeze()
        self.frozen = True
        unfreeze_at_exit()

    def load_identifiers(self) -> None:
        """Load the identifier index from a snapshot, writes since then recorded: lookups
        by identifier are then answered from memory (unless the store holds more than the
        index's capacity, when they go on querying the table)."""
        cur = self.reader()
        # Recording starts and the snapshot is taken with no write in between: a write
        # either is in the snapshot or reports its changes.
        with self._write_lock:
            self.identifiers.begin()
            cur.execute("BEGIN TRANSACTION")
            ((count,),) = cur.execute("SELECT count(*) FROM profile_identifiers").fetchall()
        try:
            if count > self.identifiers.capacity:
                log.warning(
                    "%d identifiers exceed the index's %d: lookups by identifier query the store",
                    count,
                    self.identifiers.capacity,
                )
                self.identifiers.abandon()
                return
            table = cur.sql(
                f"SELECT {IdentifierIndex.KEY_SQL} AS key, person_id FROM profile_identifiers"
            ).to_arrow_table()
        finally:
            cur.execute("COMMIT")
        self.identifiers.load(table)

    def _warm_documents(self, chunk: int, attempts: int) -> int:
        for _ in range(attempts):
            generation = self.cache.generation
            rows = self.reader().execute("SELECT person_id, doc FROM profile_documents")
            while len(self.cache) < self.cache.capacity:
                batch = rows.fetchmany(min(chunk, self.cache.capacity - len(self.cache)))
                if not batch:
                    return len(self.cache)
                if not self.cache.put(batch, generation):
                    break  # a write committed meanwhile: scan again from a fresh snapshot
            else:
                return len(self.cache)
        return len(self.cache)

    def members(
        self, segment: str, limit: int = 100, after: str | None = None
    ) -> tuple[list[dict[str, Any]], int, str | None]:
        """A page of a segment's members in person-id order, after the cursor `after`.

        Out: (members with the time they entered, total members, the next page's cursor
        or None on the last page).
        """
        cur = self.reader()
        rows = cur.execute(
            """SELECT person_id, since FROM segment_members
               WHERE segment = ? AND person_id > ? ORDER BY person_id LIMIT ?""",
            [segment, after or "", limit + 1],
        ).fetchall()
        (total,) = cur.execute(
            "SELECT count(*) FROM segment_members WHERE segment = ?", [segment]
        ).fetchone()
        page = [
            {"person_id": person, "since": since.isoformat() if since else None}
            for person, since in rows[:limit]
        ]
        return page, total, page[-1]["person_id"] if len(rows) > limit else None

    def _merged_into(self, person_id: str) -> dict[str, Any] | None:
        """The document of the person `person_id` was merged into, if it was."""
        cur = self._point_reader()
        for _ in range(16):  # a merge chain is short; the bound guards against a bad cycle
            alias = cur.execute(
                "SELECT person_id FROM person_aliases WHERE old_id = ?", [person_id]
            ).fetchall()
            if not alias:
                return None
            person_id = alias[0][0]
            rows = cur.execute(
                "SELECT doc FROM profile_documents WHERE person_id = ?", [person_id]
            ).fetchall()
            if rows:
                return _unpack(rows[0][0])
        return None

    def lookup(self, id_type: str, value: str, purpose: str | None = None) -> dict[str, Any] | None:
        """The profile holding identifier `id_type`:`value` (normalised as ingestion does),
        read for `purpose` as `get` reads it."""
        identifier = parse_identifier(id_type, value)
        if identifier is None:
            return None
        person = self.person_holding(identifier)
        return self.get(person, purpose) if person else None

    def stats(self) -> dict[str, Any]:
        """Counts of every outcome, persons and merges, as this replica has seen them."""
        cur = self.reader()
        by_outcome = dict(
            cur.execute("SELECT outcome, count(*) FROM event_outcomes GROUP BY 1").fetchall()
        )
        reasons = dict(
            cur.execute(
                "SELECT reason, count(*) FROM event_outcomes WHERE outcome = 'rejected' "
                "GROUP BY 1 ORDER BY 2 DESC, 1"
            ).fetchall()
        )
        withheld = dict(
            cur.execute(
                "SELECT reason, count(*) FROM event_outcomes WHERE outcome = 'withheld' GROUP BY 1 ORDER BY 1"
            ).fetchall()
        )
        by_topic = {
            topic: {"applied": a, "rejected": r, "withheld": w}
            for topic, a, r, w in cur.execute(
                """SELECT coalesce(topic, 'unknown'),
                          count(*) FILTER (WHERE outcome = 'applied'),
                          count(*) FILTER (WHERE outcome = 'rejected'),
                          count(*) FILTER (WHERE outcome = 'withheld')
                   FROM event_outcomes GROUP BY 1 ORDER BY 1"""
            ).fetchall()
        }
        persons, merges, conflicts = cur.execute(
            """SELECT (SELECT count(*) FROM profile_documents),
                      (SELECT count(*) FROM identity_events WHERE kind = 'merge'),
                      (SELECT count(*) FROM identity_events WHERE kind = 'conflict')"""
        ).fetchall()[0]
        links_by_rule = dict(
            cur.execute(
                """SELECT rule, count(*) FROM identity_events
                   WHERE kind IN ('record_linked', 'merge') GROUP BY 1 ORDER BY 2 DESC, 1"""
            ).fetchall()
        )
        applied = by_outcome.get("applied", 0)
        rejected = by_outcome.get("rejected", 0)
        withheld_total = by_outcome.get("withheld", 0)
        return {
            "received": applied + rejected + withheld_total,
            "applied": applied,
            "rejected": rejected,
            "withheld": withheld_total,
            "rejected_by_reason": reasons,
            "withheld_by_purpose": withheld,
            "by_source_topic": by_topic,
            "persons": persons,
            "merges": merges,
            "identity_conflicts": conflicts,
            "identity_links_by_rule": links_by_rule,
        }

    def quality(self, bucket: str = "hour", alerts: int = 100) -> dict[str, Any]:
        """Rejections per time bucket, source topic and reason; rows checked; quality alerts.

        In: the bucket width (minute, hour or day) and how many recent alerts to list.
        Rejections without a time (dead letters older than the rejected_at header) fall in a
        null bucket.
        """
        if bucket not in QUALITY_BUCKETS:
            raise ValueError(f"bucket must be one of {sorted(QUALITY_BUCKETS)}")
        cur = self.reader()
        buckets = [
            {
                "bucket": at.isoformat() if at else None,
                "topic": topic,
                "reason": reason,
                "count": count,
            }
            for at, topic, reason, count in cur.execute(
                f"""SELECT date_trunc('{bucket}', rejected_at) AS b, coalesce(topic, 'unknown'), reason, count(*)
                    FROM quality_rejections GROUP BY ALL ORDER BY b NULLS FIRST, 2, 3"""
            ).fetchall()
        ]
        by_reason = dict(
            cur.execute(
                "SELECT reason, count(*) FROM quality_rejections GROUP BY 1 ORDER BY 2 DESC, 1"
            ).fetchall()
        )
        by_topic = dict(
            cur.execute(
                "SELECT coalesce(topic, 'unknown'), count(*) FROM quality_rejections GROUP BY 1 ORDER BY 1"
            ).fetchall()
        )
        rows_checked = dict(
            cur.execute(
                """SELECT key, sum(value::BIGINT) FROM (
                       SELECT unnest(map_keys(m)) AS key, unnest(map_values(m)) AS value
                       FROM (SELECT json_transform(doc->'rows_checked', '"MAP(VARCHAR, BIGINT)"') AS m
                             FROM quality_batches))
                   GROUP BY 1 ORDER BY 1"""
            ).fetchall()
        )
        recent = []
        for batch, checked_at, doc in cur.execute(
            """SELECT batch, checked_at, doc FROM quality_batches
               WHERE json_array_length(doc->'alerts') > 0 ORDER BY checked_at DESC LIMIT ?""",
            [alerts],
        ).fetchall():
            for alert in orjson.loads(doc)["alerts"]:
                recent.append({"batch": batch, "at": checked_at.isoformat(), **alert})
        alert_counts = dict(
            cur.execute(
                """SELECT a->>'suite' || '/' || (a->>'column'), count(*)
                   FROM (SELECT unnest(from_json(doc->'alerts', '["JSON"]')) AS a FROM quality_batches)
                   GROUP BY 1 ORDER BY 1"""
            ).fetchall()
        )
        batches, gx_seconds = cur.execute(
            "SELECT count(*), coalesce(sum((doc->>'gx_seconds')::DOUBLE), 0) FROM quality_batches"
        ).fetchall()[0]
        return {
            "bucket": bucket,
            "rejections": buckets,
            "rejected_by_reason": by_reason,
            "rejected_by_topic": by_topic,
            "batches_checked": batches,
            "rows_checked_by_source": rows_checked,
            "gx_seconds": round(gx_seconds, 3),
            "alerts_by_check": alert_counts,
            "recent_alerts": recent[:alerts],
        }
