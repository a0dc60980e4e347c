"""Audits over the lineage ledger: chain verification, a subject's timeline, the provenance
of one attribute, and exports.

Everything here reads a DuckDB connection that holds the `lineage` table (a worker's
state or an API replica, which keeps the ledger as published on tessera.lineage) and,
for persons and identity history, a `SubjectDirectory` (the replica's profile store).
Nothing here writes; answers carry identifier hashes and ids, never identifier values.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import duckdb
import orjson
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from consent.ledger import VerifyResult, entry_hash, verify_chain
from consent.policy import load_policy
from identity.normalise import ID_TYPES, Identifier, identifier_hash, parse_identifier

# Computed traits and the event kinds they aggregate (None: every applied event).
COMPUTED_SOURCES: dict[str, tuple[str, ...] | None] = {
    "event_count": None,
    "first_seen": None,
    "last_seen": None,
    "order_count": ("order_completed",),
    "refund_count": ("order_refunded",),
    "lifetime_value": ("order_completed", "order_refunded"),
    "open_tickets": ("ticket_opened", "ticket_closed"),
    "last_csat": ("csat_submitted",),
}
# Ledger entries that record an erasure (written by the privacy stage), by kind or decision.
ERASURE_MARKERS = frozenset({"erasure", "erasure_request", "erased"})
EXPORT_FORMATS = ("parquet", "csv")
_DECISION_OUTCOME = {"allowed": "applied", "withheld": "withheld", "consent_recorded": "recorded"}
EXPORT_SCHEMA = pa.schema(
    [
        ("seq", pa.int64()),
        ("event_key", pa.string()),
        ("kind", pa.string()),
        ("event_ts", pa.string()),
        ("decision", pa.string()),
        ("purpose", pa.string()),
        ("basis", pa.string()),
        ("consent_ref", pa.string()),
        ("jurisdiction", pa.string()),
        ("policy_version", pa.string()),
        ("person_id", pa.string()),
        ("subjects", pa.string()),
        ("statements", pa.string()),
        ("attributes", pa.string()),
        ("fields_masked", pa.string()),
        ("entry", pa.string()),
        ("prev_hash", pa.string()),
        ("hash", pa.string()),
    ]
)


class SubjectDirectory(Protocol):
    """Who holds an identifier, a person's profile document, its identity history, and
    which person each identity record belongs to now."""

    def person_holding(self, identifier: Identifier) -> str | None: ...

    def document(self, person_id: str) -> dict[str, Any] | None: ...

    def identity_history(self, person_ids: set[str]) -> list[dict[str, Any]]: ...

    def records_held(self, person_ids: set[str]) -> set[str]: ...

    def record_owners(self, record_ids: set[str]) -> dict[str, str]: ...


class AuditUnavailable(RuntimeError):
    """The store holds the ledger but not what this audit also needs (a replica's profiles)."""


def parse_subject(text: str) -> Identifier:
    """`TYPE:VALUE` (e.g. `email:ada@example.org`) as a normalised identifier.

    Raises ValueError saying what is wrong: no colon, an unknown type, an invalid value.
    """
    id_type, sep, value = text.partition(":")
    if not sep or not value:
        raise ValueError(f"{text!r}: give the subject as TYPE:VALUE, e.g. email:ada@example.org")
    if id_type not in ID_TYPES:
        raise ValueError(f"{id_type!r} is not an identifier type; one of {', '.join(ID_TYPES)}")
    identifier = parse_identifier(id_type, value)
    if identifier is None:
        raise ValueError(f"{value!r} is not a valid {id_type}")
    return identifier


def _when(text: str | None) -> datetime:
    """An ISO time as naive UTC for ordering (missing or unreadable ones sort first)."""
    try:
        parsed = datetime.fromisoformat(text) if text else datetime.min
    except ValueError:
        parsed = datetime.min
    return parsed.astimezone(UTC).replace(tzinfo=None) if parsed.tzinfo else parsed


def resolve_statements(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The consent statements in ledger records, resolved as the gate resolves them.

    In: ledger records (entry content plus seq). Out: one row per statement, ordered by
    its own time (ties by arrival), each saying whether it arrived out of order (a later
    statement for its purpose had already been recorded), whether it is in force now (the
    latest by time for its purpose) and, if not, the statement that superseded it.
    """
    statements = [
        {
            "seq": record["seq"],
            "event_key": record["event_key"],
            "kind": record.get("kind"),
            "at": record.get("event_ts"),
            "subjects": record.get("subjects") or [],
            **statement,
        }
        for record in records
        for statement in record.get("statements") or []
    ]
    newest: dict[str, tuple[datetime, int]] = {}
    for row in sorted(statements, key=lambda r: r["seq"]):
        position = (_when(row["at"]), row["seq"])
        previous = newest.get(row["purpose"])
        row["arrived_out_of_order"] = previous is not None and position[0] < previous[0]
        if previous is None or position > previous:
            newest[row["purpose"]] = position
    ordered = sorted(statements, key=lambda r: (_when(r["at"]), r["seq"]))
    later: dict[str, str] = {}
    for row in reversed(ordered):
        row["superseded_by"] = later.get(row["purpose"])
        row["in_force"] = row["superseded_by"] is None
        later[row["purpose"]] = row["event_key"]
    return ordered


def _in_force(statements: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        s["purpose"]: {
            "status": s["status"],
            "since": s["at"],
            "event_key": s["event_key"],
            "source": s["source"],
            "policy_version": s["policy_version"],
            "jurisdiction": s["jurisdiction"],
        }
        for s in statements
        if s["in_force"]
    }


def _is_erasure(record: dict[str, Any]) -> bool:
    return record.get("kind") in ERASURE_MARKERS or record.get("decision") in ERASURE_MARKERS


def _admission(record: dict[str, Any]) -> dict[str, Any]:
    """How the gate decided one event: decision, purpose, basis, consent relied on, policy."""
    return {
        "seq": record["seq"],
        "event_key": record["event_key"],
        "kind": record.get("kind"),
        "at": record.get("event_ts"),
        "decision": _DECISION_OUTCOME.get(record.get("decision"), record.get("decision")),
        "purpose": record.get("purpose"),
        "basis": record.get("basis"),
        "consent_ref": record.get("consent_ref"),
        "policy_version": record.get("policy_version"),
        "jurisdiction": record.get("jurisdiction"),
        "fields_masked": record.get("fields_masked") or [],
        "attributes": record.get("attributes") or [],
        "person_id": record.get("person_id"),
        "hash": record["hash"],
    }


def _now_of(
    admission: dict[str, Any], record: dict[str, Any], owners: dict[str, str], aliases: set[str]
) -> dict[str, Any]:
    """An admission under the person its event's identity record belongs to now: when that
    is not the person it was ingested as, `ingested_as` names the latter and `moved_by`
    says how it moved (merge: that person was merged into this one; split: it was not)."""
    now = owners.get(record.get("record_id") or "")
    ingested = admission.get("person_id")
    if now and now != ingested:
        admission["ingested_as"] = ingested
        admission["moved_by"] = "merge" if ingested in aliases else "split"
        admission["person_id"] = now
    return admission


def build_timeline(
    records: list[dict[str, Any]],
    identity_events: list[dict[str, Any]],
    owners: dict[str, str] | None = None,
    aliases: set[str] | None = None,
) -> dict[str, Any]:
    """A subject's timeline from their ledger records and identity events (pure).

    `owners` (record id -> person now) and `aliases` (every person id that is now the
    subject's person) put each decision under the person its event belongs to now.
    Out: `current_consent` per purpose, `counts`, and `timeline`: rows ordered by time
    (then ledger order), each with category consent | decision | identity | erasure, at,
    seq, event_key, kind, purpose, outcome and a category-specific `detail`.
    """
    statements = resolve_statements(records)
    rows: list[dict[str, Any]] = []
    for s in statements:
        rows.append(
            {
                "category": "consent",
                "at": s["at"],
                "seq": s["seq"],
                "event_key": s["event_key"],
                "kind": s["kind"],
                "purpose": s["purpose"],
                "outcome": s["status"],
                "detail": {
                    "source": s["source"],
                    "policy_version": s["policy_version"],
                    "jurisdiction": s["jurisdiction"],
                    "arrived_out_of_order": s["arrived_out_of_order"],
                    "in_force": s["in_force"],
                    "superseded_by": s["superseded_by"],
                },
            }
        )
    counts = {"consent": len(statements), "applied": 0, "withheld": 0, "identity": 0, "erasure": 0}
    for record in records:
        if record.get("kind") == "consent_change":
            continue  # its statement is the consent row above
        erasure = _is_erasure(record)
        admission = _now_of(_admission(record), record, owners or {}, aliases or set())
        category = "erasure" if erasure else "decision"
        if erasure:
            counts["erasure"] += 1
        elif admission["decision"] in ("applied", "withheld"):
            counts[admission["decision"]] += 1
        rows.append(
            {
                "category": category,
                "at": admission.pop("at"),
                "seq": admission.pop("seq"),
                "event_key": admission.pop("event_key"),
                "kind": admission.pop("kind"),
                "purpose": admission.pop("purpose"),
                "outcome": admission.pop("decision"),
                "detail": admission,
            }
        )
    for event in identity_events:
        counts["identity"] += 1
        rows.append(
            {
                "category": "identity",
                "at": event.get("ts"),
                "seq": None,
                "event_key": event.get("event_key"),
                "kind": event["kind"],
                "purpose": None,
                "outcome": event["kind"],
                "detail": {
                    "link_id": event.get("link_id"),
                    "person_id": event.get("person_id"),
                    "other_person_id": event.get("other_person_id"),
                    "rule": event.get("rule"),
                },
            }
        )
    rows.sort(key=lambda r: (_when(r["at"]), r["seq"] if r["seq"] is not None else -1))
    return {"current_consent": _in_force(statements), "counts": counts, "timeline": rows}


def _json_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


class Audit:
    """Audit queries over one store's ledger (and, where given, its subject directory)."""

    def __init__(
        self,
        conn: duckdb.DuckDBPyConnection,
        directory: SubjectDirectory | None = None,
        purposes: Iterable[str] | None = None,
    ) -> None:
        """`purposes`: the views an attribute's provenance covers (default: the packaged
        policy's purposes); views a profile holds beyond them are covered too."""
        self.conn = conn
        self.directory = directory
        self.purposes = set(purposes if purposes is not None else load_policy().purposes)

    def verify(self) -> VerifyResult:
        """Recompute the whole chain; the first broken entry, or ok."""
        return verify_chain(self.conn.cursor())

    def _records(self, where: str, params: list[Any]) -> list[dict[str, Any]]:
        rows = (
            self.conn.cursor()
            .execute(
                f"SELECT seq, entry, prev_hash, hash FROM lineage WHERE {where} ORDER BY seq",
                params,
            )
            .fetchall()
        )
        return [
            {**orjson.loads(entry), "seq": seq, "prev_hash": prev_hash, "hash": digest}
            for seq, entry, prev_hash, digest in rows
        ]

    def records_of(
        self, subjects: set[str], persons: set[str], records: set[str] | None = None
    ) -> list[dict[str, Any]]:
        """Ledger records naming any of the identifier hashes `subjects`, person ids or
        identity record ids `records`."""
        return self._records(
            """list_has_any(from_json(entry->'subjects', '["VARCHAR"]'), ?::VARCHAR[])
               OR entry->>'person_id' IN (SELECT unnest(?::VARCHAR[]))
               OR entry->>'record_id' IN (SELECT unnest(?::VARCHAR[]))""",
            [sorted(subjects), sorted(persons), sorted(records or ())],
        )

    def _owned(
        self, records: list[dict[str, Any]], person_ids: set[str]
    ) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """The records that are still `person_ids`' own: a record whose identity record
        belongs to another person now (split off) is theirs. Out: those records, and the
        person each of their identity records belongs to now (where the store knows)."""
        if self.directory is None:
            return records, {}
        owners = self.directory.record_owners(
            {r["record_id"] for r in records if r.get("record_id")}
        )
        mine = [
            r
            for r in records
            if (owner := owners.get(r.get("record_id") or "")) is None or owner in person_ids
        ]
        return mine, owners

    def _subject_records(
        self, identifier: Identifier
    ) -> tuple[str | None, set[str], set[str], list[dict[str, Any]], dict[str, str]]:
        """`subject_scope`, then the subject's ledger records: those naming them, their
        person ids or the identity records their person holds now, less those that
        belong to another person now; and the person each record's identity record is."""
        person, person_ids, hashes = self.subject_scope(identifier)
        held = self.directory.records_held({person}) if self.directory and person else set()
        records, owners = self._owned(self.records_of(hashes, person_ids, held), person_ids)
        return person, person_ids, hashes, records, owners

    def records_by_key(self, keys: set[str]) -> dict[str, dict[str, Any]]:
        if not keys:
            return {}
        records = self._records("event_key IN (SELECT unnest(?::VARCHAR[]))", [sorted(keys)])
        return {r["event_key"]: r for r in records}

    def _person(self, person_id: str) -> tuple[dict[str, Any] | None, set[str], set[str]]:
        """A person's document, every person id that is now them, their identifier hashes."""
        doc = self.directory.document(person_id) if self.directory else None
        if doc is None:
            return None, {person_id}, set()
        ids = {doc["person_id"], person_id, *(doc.get("merged_from") or [])}
        hashes = {
            identifier_hash(Identifier(id_type, value))
            for id_type, values in (doc.get("identifiers") or {}).items()
            for value in values
        }
        return doc, ids, hashes

    def subject_scope(self, identifier: Identifier) -> tuple[str | None, set[str], set[str]]:
        """The person an identifier belongs to (if known), their person ids and identifier
        hashes: the scope of a subject's audit."""
        subject = identifier_hash(identifier)
        person = self.directory.person_holding(identifier) if self.directory else None
        if person is None:
            # Not in any profile (every event withheld, or a worker store): the ledger's
            # own person ids for this identifier.
            named = {
                r["person_id"] for r in self.records_of({subject}, set()) if r.get("person_id")
            }
            person = min(named) if len(named) == 1 else None
            if person is None:
                return None, named, {subject}
        doc, ids, hashes = self._person(person)
        return (doc["person_id"] if doc else person), ids, hashes | {subject}

    def subject(self, identifier: Identifier) -> dict[str, Any] | None:
        """The timeline of the person holding `identifier` (see `build_timeline`), or None
        when the ledger has nothing on them."""
        person, person_ids, hashes, records, owners = self._subject_records(identifier)
        history = self.directory.identity_history(person_ids) if self.directory else []
        if not records and not history:
            return None
        return {
            "subject": {
                "type": identifier.type,
                "identifier_hash": identifier_hash(identifier),
                "person_id": person,
                "person_ids": sorted(person_ids),
                "identifier_hashes": sorted(hashes),
            },
            **build_timeline(records, history, owners, person_ids),
        }

    def attribute(self, person_id: str, name: str, limit: int = 1000) -> dict[str, Any] | None:
        """The provenance of attribute `name` of a person, per purpose view.

        Out: per purpose, whether the view holds it, the event it comes from now, how that
        event was admitted (decision, basis, the consent statement relied on, policy
        version) and the consent in force for the purpose; and `events`: every ledger
        record of the person that produced the attribute (at most `limit`, newest last).
        None when the person or the attribute is unknown.
        """
        if self.directory is None:
            raise AuditUnavailable("attribute provenance needs a replica store with profiles")
        doc, person_ids, hashes = self._person(person_id)
        if doc is None:
            return None
        kinds = COMPUTED_SOURCES.get(name, ())
        computed = name in COMPUTED_SOURCES
        views: list[dict[str, Any]] = []
        sources: set[str] = set()
        held = doc.get("views") or {}
        for purpose in sorted(self.purposes | set(held)):
            view = held.get(purpose) or {}
            trait = None if computed else (view.get("traits") or {}).get(name)
            present = name in (view.get("computed") or {}) if computed else trait is not None
            views.append(
                {
                    "purpose": purpose,
                    "present": present,
                    "source_event": trait["event_key"] if trait else None,
                    "ts": trait["ts"] if trait else None,
                }
            )
            if trait:
                sources.add(trait["event_key"])
        if computed:
            where = "entry->>'decision' = 'allowed'"
            params: list[Any] = []
            if kinds is not None:
                where += " AND entry->>'kind' IN (SELECT unnest(?::VARCHAR[]))"
                params.append(list(kinds))
        else:
            where = "list_contains(from_json(entry->'attributes', '[\"VARCHAR\"]'), ?)"
            params = [name]
        producing, owners = self._owned(
            self._records(
                f"""({where}) AND (entry->>'person_id' IN (SELECT unnest(?::VARCHAR[]))
                                   OR entry->>'record_id' IN (SELECT unnest(?::VARCHAR[])))""",
                [
                    *params,
                    sorted(person_ids),
                    sorted(self.directory.records_held({doc["person_id"]})),
                ],
            ),
            person_ids,
        )
        known = {r["event_key"] for r in producing}
        producing += self.records_by_key(sources - known).values()
        if not producing and not any(v["present"] for v in views):
            return None
        producing.sort(key=lambda r: r["seq"])
        truncated = len(producing) > limit
        producing = producing[-limit:]
        consent_records = self.records_by_key(
            {r["consent_ref"] for r in producing if r.get("consent_ref")}
        )
        in_force = _in_force(resolve_statements(self.records_of(hashes, set())))
        events = []
        for record in producing:
            admission = _now_of(_admission(record), record, owners, person_ids)
            admission["consent"] = self._consent_relied_on(record, consent_records)
            admission["source_of"] = [
                v["purpose"] for v in views if v["source_event"] == record["event_key"]
            ]
            events.append(admission)
        by_key = {e["event_key"]: e for e in events}
        for view in views:
            view["admitted"] = by_key.get(view["source_event"]) if view["source_event"] else None
            view["consent_in_force"] = in_force.get(view["purpose"])
        return {
            "person_id": doc["person_id"],
            "attribute": name,
            "computed": computed,
            "views": views,
            "events": events,
            "truncated": truncated,
        }

    @staticmethod
    def _consent_relied_on(
        record: dict[str, Any], consent_records: dict[str, dict[str, Any]]
    ) -> dict[str, Any] | None:
        """The consent statement an event was admitted under, or the default it fell back on."""
        if record.get("basis") == "jurisdiction-default":
            return {"basis": "jurisdiction-default", "jurisdiction": record.get("jurisdiction")}
        ref = consent_records.get(record.get("consent_ref") or "")
        if ref is None:
            return None
        for statement in ref.get("statements") or []:
            if statement["purpose"] == record.get("purpose"):
                return {
                    "event_key": ref["event_key"],
                    "at": ref.get("event_ts"),
                    "seq": ref["seq"],
                    **statement,
                }
        return None

    def export_table(self, identifier: Identifier | None = None) -> pa.Table:
        """The ledger (or one subject's part of it) as a flat Arrow table: one row per entry,
        lists as JSON text, and `entry` in the canonical form its hash covers."""
        if identifier is None:
            records = self._records("true", [])
        else:
            records = self._subject_records(identifier)[3]
        columns: dict[str, list[Any]] = {name: [] for name in EXPORT_SCHEMA.names}
        for record in records:
            entry = {k: v for k, v in record.items() if k not in ("seq", "prev_hash", "hash")}
            for name in EXPORT_SCHEMA.names:
                if name in ("subjects", "statements", "attributes", "fields_masked"):
                    value = orjson.dumps(_json_list(entry.get(name))).decode()
                elif name == "entry":
                    value = orjson.dumps(entry, option=orjson.OPT_SORT_KEYS).decode()
                else:
                    value = record.get(name)
                columns[name].append(value)
        return pa.table(columns, schema=EXPORT_SCHEMA)

    def export(
        self, path: Path, fmt: str | None = None, identifier: Identifier | None = None
    ) -> int:
        """Write the export to `path` as Parquet or CSV (by `fmt`, else the file's suffix).
        Out: the number of rows written."""
        fmt = fmt or path.suffix.lstrip(".").lower()
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"export format must be one of {EXPORT_FORMATS}, not {fmt!r}")
        table = self.export_table(identifier)
        write_export(table, path, fmt)
        return table.num_rows


def write_export(table: pa.Table, sink: Any, fmt: str) -> None:
    """Write an export table as Parquet or CSV to a path or a binary file-like object."""
    if fmt == "parquet":
        pq.write_table(table, sink)
    else:
        pa_csv.write_csv(table, sink)


def broken_export_rows(table: pa.Table) -> list[int]:
    """Rows of an export whose hash does not cover its entry and previous hash, or whose
    previous hash is not the hash of the row before it (consecutive seqs). Out: their seqs."""
    broken: list[int] = []
    previous: tuple[int, str] | None = None
    for row in table.select(["seq", "entry", "prev_hash", "hash"]).to_pylist():
        ok = entry_hash(row["prev_hash"], orjson.loads(row["entry"])) == row["hash"]
        if previous is not None and previous[0] + 1 == row["seq"]:
            ok = ok and previous[1] == row["prev_hash"]
        if not ok:
            broken.append(row["seq"])
        previous = (row["seq"], row["hash"])
    return broken
