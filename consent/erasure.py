"""Erasure of a data subject (GDPR art. 17): requests, the erasure itself, and its certificate.

A request names its subject by identifier hash only (`identifier_hash`), so the request
topic never carries the identifier. The worker erases, in the batch's transaction:

- the identity records that carry the identifier, then re-clusters what remains (unmerge):
  a person merged with the subject through those records splits off with their own id;
- what is left of the subject: pieces linked to the subject's oldest erased record by a
  user id, customer id, email or phone, or by an anonymous id when the piece holds none of
  those itself (a shared device with someone else's login stays theirs);
- the subject's facts, trait facts, consent state, profile versions and person rows; the
  outcomes keep their event keys (so replays stay duplicates) but lose the person id;
- the per-subject keys of everything sealed for the subject (crypto-shredding).

The erased subjects' hashes are remembered with the request time: an event of theirs with
an earlier timestamp (a replay, a late delivery) is withheld; a later one starts anew.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import duckdb
import jsonschema_rs
import orjson
import pyarrow as pa

from consent.keys import SubjectKeyStore
from identity.normalise import Identifier, identifier_hash
from identity.records import STRONG_FIELDS
from identity.resolver import IdentityResolver, Resolution

REQUEST_SCHEMA = Path(__file__).parent.parent / "schemas/v1/requests/privacy_request.json"
ERASED = "erased"

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS erased_subjects (
    subject VARCHAR PRIMARY KEY, erased_at TIMESTAMPTZ, request_id VARCHAR
);
CREATE TABLE IF NOT EXISTS erasures (request_id VARCHAR PRIMARY KEY, certificate JSON);
"""
_ANONYMOUS = "anonymous_id"
_NAMED = tuple(f for f in STRONG_FIELDS if f != _ANONYMOUS)


@cache
def _validator() -> jsonschema_rs.Draft202012Validator:
    return jsonschema_rs.Draft202012Validator(
        json.loads(REQUEST_SCHEMA.read_text()), validate_formats=True
    )


@dataclass(frozen=True)
class ErasureRequest:
    """A valid erasure request: its id, the subject's identifier hash, when and by whom."""

    request_id: str
    subject: str
    requested_at: datetime
    requested_by: str


def erasure_request(identifier: Identifier, requested_by: str) -> dict[str, Any]:
    """The request document for a normalised identifier (what the API and CLI produce)."""
    return {
        "type": "erasure",
        "version": 1,
        "request_id": "er_" + uuid.uuid4().hex,
        "subject": identifier_hash(identifier),
        "requested_at": datetime.now(UTC).isoformat(timespec="microseconds"),
        "requested_by": requested_by,
    }


def parse_request(raw: bytes) -> ErasureRequest | str:
    """A request from raw bytes, or the reason it is malformed."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return f"not JSON: {exc}"[:200]
    errors = [e.message for e in _validator().iter_errors(doc)]
    if errors:
        return "; ".join(errors)[:300]
    requested_at = datetime.fromisoformat(doc["requested_at"])
    if requested_at.tzinfo is None:
        requested_at = requested_at.replace(tzinfo=UTC)
    return ErasureRequest(doc["request_id"], doc["subject"], requested_at, doc["requested_by"])


def _hash_sql(column: str) -> str:
    """SQL for identifier_hash over a column holding normalised values of its own type."""
    return f"('{column}:' || left(sha256('{column}:' || {column}), 16))"


@dataclass
class ErasureResult:
    """What one erasure did: the certificate (no PII), the identity changes, persons erased."""

    certificate: dict[str, Any]
    resolutions: list[Resolution] = field(default_factory=list)
    erased_persons: set[str] = field(default_factory=set)
    touched: set[str] = field(default_factory=set)  # persons split off, to rebuild


class SubjectEraser:
    """Erases subjects from one worker's DuckDB state (inside the caller's transaction)."""

    def __init__(
        self,
        conn: duckdb.DuckDBPyConnection,
        identity: IdentityResolver,
        keys: SubjectKeyStore | None = None,
    ) -> None:
        self.conn = conn
        self.identity = identity
        self.keys = keys
        conn.execute(SCHEMA_SQL)

    def certificate(self, request_id: str) -> dict[str, Any] | None:
        rows = self.conn.execute(
            "SELECT certificate FROM erasures WHERE request_id = ?", [request_id]
        ).fetchall()
        return orjson.loads(rows[0][0]) if rows else None

    def erase(self, request: ErasureRequest, key: str) -> ErasureResult:
        """Erase the subject of `request`; a request already carried out changes nothing."""
        done = self.certificate(request.request_id)
        if done is not None:
            return ErasureResult(done)
        ts = request.requested_at
        id_type = request.subject.split(":", 1)[0]
        seeds = self._records_where(
            f"{id_type} IS NOT NULL AND {_hash_sql(id_type)} = ?", [request.subject]
        )
        before = self._records_of_persons({r["person_id"] for r in seeds})
        result = ErasureResult({})
        erased_records: set[str] = set()
        if seeds:
            oldest = min(seeds, key=lambda r: (r["first_ts"], r["first_event"], r["record_id"]))
            result.resolutions.append(
                self.identity.erase_records([r["record_id"] for r in seeds], key, ts)
            )
            erased_records |= {r["record_id"] for r in seeds}
            candidates = {r["person_id"] for r in before} | {
                p for res in result.resolutions for p in res.moved.values()
            }
            remaining = self._records_of_persons(candidates)
            subject_pieces = self._subject_pieces(oldest, remaining)
            rest = [r["record_id"] for r in remaining if r["person_id"] in subject_pieces]
            if rest:
                result.resolutions.append(self.identity.erase_records(rest, key, ts))
                erased_records |= set(rest)
            left = {r["person_id"] for r in self._records_of_persons(candidates)}
            result.erased_persons = candidates - left
            result.touched = left
        subjects = self._subject_hashes(request.subject, before, erased_records)
        counts = self._delete_state(erased_records, result.erased_persons, subjects)
        counts["identity.records"] = len(erased_records)
        self.conn.executemany(
            "INSERT OR IGNORE INTO erased_subjects VALUES (?, ?, ?)",
            [(s, ts, request.request_id) for s in sorted(subjects)],
        )
        shredded = self.keys.shred(subjects | result.erased_persons) if self.keys else 0
        result.certificate = {
            "request_id": request.request_id,
            "type": "erasure",
            "subject": request.subject,
            "requested_at": request.requested_at.isoformat(),
            "requested_by": request.requested_by,
            "erased_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "found": bool(seeds) or any(counts.values()),
            "persons_erased": sorted(result.erased_persons),
            "persons_split_off": sorted(result.touched),
            "subject_hashes": sorted(subjects),
            "erased": {"worker": counts, "key_store": {"keys_shredded": shredded}},
            # Everything before these offsets was consumed before the erasure: on Apache
            # Kafka, DeleteRecords up to them removes plaintext that outside producers wrote.
            "consumed_before": {
                f"{topic}/{partition}": offset
                for topic, partition, offset in self.conn.execute(
                    'SELECT topic, "partition", next_offset FROM source_offsets ORDER BY 1, 2'
                ).fetchall()
            },
        }
        return result

    def record(self, certificate: dict[str, Any]) -> None:
        """Store a finished certificate (with its ledger hash): a replayed request finds it."""
        self.conn.execute(
            "INSERT OR REPLACE INTO erasures VALUES (?, ?)",
            [certificate["request_id"], orjson.dumps(certificate).decode()],
        )

    # -- pieces ------------------------------------------------------------------------------

    def _records_where(self, where: str, params: list[Any]) -> list[dict[str, Any]]:
        cur = self.conn.execute(
            f"""SELECT record_id, person_id, first_ts, first_event, {", ".join(STRONG_FIELDS)}
                FROM id_records WHERE {where}""",
            params,
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def _records_of_persons(self, persons: set[str]) -> list[dict[str, Any]]:
        if not persons:
            return []
        return self._records_where("person_id IN (SELECT unnest(?))", [sorted(persons)])

    @staticmethod
    def _subject_pieces(oldest: dict[str, Any], remaining: list[dict[str, Any]]) -> set[str]:
        """Persons left after the seed records went that are still the subject's."""
        by_person: dict[str, list[dict[str, Any]]] = {}
        for record in remaining:
            by_person.setdefault(record["person_id"], []).append(record)
        pieces = set()
        for person, records in by_person.items():
            named = any(r[f] == oldest[f] and r[f] for r in records for f in _NAMED)
            own_names = any(r[f] for r in records for f in _NAMED)
            anonymous = any(r[_ANONYMOUS] and r[_ANONYMOUS] == oldest[_ANONYMOUS] for r in records)
            if named or (anonymous and not own_names):
                pieces.add(person)
        return pieces

    def _subject_hashes(
        self, requested: str, before: list[dict[str, Any]], erased: set[str]
    ) -> set[str]:
        """The requested hash and those of identifiers only the erased records held."""
        kept: set[tuple[str, str]] = set()
        for name in STRONG_FIELDS:
            values = sorted({r[name] for r in before if r[name] and r["record_id"] in erased})
            if values:
                kept |= {
                    (name, v)
                    for (v,) in self.conn.execute(
                        f"SELECT DISTINCT {name} FROM id_records WHERE {name} IN (SELECT unnest(?))",
                        [values],
                    ).fetchall()
                }
        subjects = {requested}
        for record in before:
            if record["record_id"] not in erased:
                continue
            for name in STRONG_FIELDS:
                value = record[name]
                if value and (name, value) not in kept:
                    subjects.add(identifier_hash(Identifier(name, value)))
        return subjects

    def _delete_state(
        self, records: set[str], persons: set[str], subjects: set[str]
    ) -> dict[str, int]:
        """Delete the subject's rows from every table of the worker's state; counts per table."""
        q = self.conn.execute
        self.conn.register(
            "_erase_records", pa.table({"record_id": pa.array(sorted(records), pa.string())})
        )
        self.conn.register(
            "_erase_persons", pa.table({"person_id": pa.array(sorted(persons), pa.string())})
        )
        self.conn.register(
            "_erase_subjects", pa.table({"subject": pa.array(sorted(subjects), pa.string())})
        )
        counts: dict[str, int] = {}
        try:
            # Computed-trait accumulators are counted as one table, folded or appended
            # (profiles/builder.py keeps each batch's in `trait_deltas` until folded).
            for table in ("facts", "trait_facts", "trait_state", "trait_deltas"):
                counted = "trait_state" if table == "trait_deltas" else table
                counts[counted] = (
                    counts.get(counted, 0)
                    + q(
                        # A kept record's facts stay (the split moves them to their person).
                        f"""DELETE FROM {table} WHERE record_id IN (SELECT record_id FROM _erase_records)
                        OR (person_id IN (SELECT person_id FROM _erase_persons)
                            AND record_id NOT IN (SELECT record_id FROM id_records))"""
                    ).fetchone()[0]
                )
            counts["consent_state"] = q(
                """DELETE FROM consent_state WHERE (id_type || ':' ||
                       left(sha256(id_type || ':' || id_value), 16)) IN (SELECT subject FROM _erase_subjects)"""
            ).fetchone()[0]
            for table in ("profile_versions", "id_persons"):
                counts[table] = q(
                    f"DELETE FROM {table} WHERE person_id IN (SELECT person_id FROM _erase_persons)"
                ).fetchone()[0]
            counts["outcomes.person_id"] = q(
                """UPDATE outcomes SET person_id = NULL
                   WHERE person_id IN (SELECT person_id FROM _erase_persons)"""
            ).fetchone()[0]
        finally:
            for name in ("_erase_records", "_erase_persons", "_erase_subjects"):
                self.conn.unregister(name)
        return counts


def erased_before(
    conn: duckdb.DuckDBPyConnection, items: list[tuple[datetime | None, list[Identifier]]]
) -> list[str | None]:
    """For each (event time, identifiers): the erasure request that withholds it, or None.

    An event is withheld when one of its identifiers belongs to an erased subject and
    it happened at or before that erasure; a later event is a new start.
    """
    if not conn.execute("SELECT 1 FROM erased_subjects LIMIT 1").fetchall():
        return [None] * len(items)
    hashes = sorted({identifier_hash(i) for _, ids in items for i in ids})
    erased = {
        subject: (at, request)
        for subject, at, request in conn.execute(
            "SELECT subject, erased_at, request_id FROM erased_subjects WHERE subject IN (SELECT unnest(?))",
            [hashes],
        ).fetchall()
    }
    found: list[str | None] = []
    for ts, ids in items:
        hit = None
        for identifier in ids:
            at_request = erased.get(identifier_hash(identifier))
            if at_request and (ts is None or ts <= at_request[0]):
                hit = at_request[1]
                break
        found.append(hit)
    return found
