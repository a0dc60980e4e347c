"""The deterministic identity graph: strong identifiers link events to persons with stable ids.

A person's id is derived from the first event that created it. When an event shows two
persons are one, they merge and the older person's id survives. Limits per identifier
type (one user_id per person, a few emails and phones) stop over-merging: an identifier
that would break a limit is not linked, and the conflict is recorded, never merged away.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import duckdb
import pyarrow as pa

from identity.normalise import Identifier

DEFAULT_LIMITS = {"user_id": 1, "email": 5, "phone": 5, "anonymous_id": 50}
# Which identifier decides where an event goes when its identifiers disagree.
STRENGTH = {"user_id": 0, "email": 1, "phone": 2, "anonymous_id": 3}

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS id_links (
    id_type VARCHAR, id_value VARCHAR, person_id VARCHAR NOT NULL,
    event_key VARCHAR, ts TIMESTAMPTZ,
    PRIMARY KEY (id_type, id_value)
);
CREATE TABLE IF NOT EXISTS persons (
    person_id VARCHAR PRIMARY KEY, first_ts TIMESTAMPTZ, first_event VARCHAR, merged_into VARCHAR
);
CREATE TABLE IF NOT EXISTS identity_log (
    link_id VARCHAR PRIMARY KEY, kind VARCHAR, person_id VARCHAR, other_person_id VARCHAR,
    rule VARCHAR, event_key VARCHAR, ts TIMESTAMPTZ
);
"""


def person_id_for(event_key: str) -> str:
    """The stable id of a person first seen in the event `event_key`."""
    return "p_" + hashlib.blake2b(event_key.encode(), digest_size=8).hexdigest()


def identifier_hash(identifier: Identifier) -> str:
    """A non-reversible handle for an identifier, safe to publish in link events."""
    digest = hashlib.sha256(f"{identifier.type}:{identifier.value}".encode()).hexdigest()
    return f"{identifier.type}:{digest[:16]}"


@dataclass
class Person:
    person_id: str
    first_ts: datetime
    first_event: str
    ids: dict[str, set[str]] = field(default_factory=dict)
    merged_into: str | None = None

    @property
    def age(self) -> tuple[datetime, str]:
        return (self.first_ts, self.person_id)


@dataclass
class Resolution:
    """What a batch did to the graph."""

    person_of: list[str]  # the person of each input item, after every merge in the batch
    merged: dict[str, str]  # merged-away person -> surviving person
    touched: set[str]  # surviving persons whose identifiers changed
    log: list[dict[str, Any]]  # person_created / merge / conflict events, in order


class IdentityGraph:
    """Deterministic linking over a DuckDB-backed graph; resolves a batch at a time."""

    def __init__(self, conn: duckdb.DuckDBPyConnection, limits: dict[str, int] | None = None):
        self.conn = conn
        self.limits = dict(DEFAULT_LIMITS if limits is None else limits)
        conn.execute(SCHEMA_SQL)

    def _load(
        self, identifiers: set[Identifier]
    ) -> tuple[dict[Identifier, str], dict[str, Person]]:
        owner: dict[Identifier, str] = {}
        persons: dict[str, Person] = {}
        if not identifiers:
            return owner, persons
        wanted = pa.table(
            {"id_type": [i.type for i in identifiers], "id_value": [i.value for i in identifiers]}
        )
        self.conn.register("_graph_ids", wanted)
        try:
            rows = self.conn.execute(
                """WITH hit AS (
                       SELECT DISTINCT l.person_id FROM id_links l JOIN _graph_ids USING (id_type, id_value)
                   )
                   SELECT p.person_id, p.first_ts, p.first_event, l.id_type, l.id_value
                   FROM hit JOIN persons p USING (person_id)
                   JOIN id_links l ON l.person_id = p.person_id"""
            ).fetchall()
        finally:
            self.conn.unregister("_graph_ids")
        for person_id, first_ts, first_event, id_type, id_value in rows:
            person = persons.get(person_id)
            if person is None:
                person = persons[person_id] = Person(person_id, first_ts, first_event)
            person.ids.setdefault(id_type, set()).add(id_value)
            owner[Identifier(id_type, id_value)] = person_id
        return owner, persons

    def _fits(self, ids: dict[str, set[str]], extra: dict[str, set[str]]) -> bool:
        return all(
            len(ids.get(t, set()) | values) <= self.limits.get(t, 1_000_000)
            for t, values in extra.items()
        )

    def resolve(self, items: list[tuple[str, datetime, list[Identifier]]]) -> Resolution:
        """Link a batch of events to persons, in order, inside the caller's transaction.

        In: (event_key, timestamp, identifiers) per event. Out: a Resolution.
        """
        owner, persons = self._load({i for _, _, ids in items for i in ids})
        new_links: dict[Identifier, tuple[str, str, datetime]] = {}
        dirty_persons: set[str] = set()
        merged: dict[str, str] = {}
        touched: set[str] = set()
        log: list[dict[str, Any]] = []
        assigned: list[str] = []

        def record(kind: str, person: str, other: str | None, rule: str, key: str, ts: datetime):
            log.append(
                {
                    # Numbered within the event, so ids do not depend on how events were batched.
                    "link_id": f"{key}:{kind}:{sum(1 for e in log if e['event_key'] == key)}",
                    "kind": kind,
                    "person_id": person,
                    "other_person_id": other,
                    "rule": rule,
                    "event_key": key,
                    "ts": ts,
                }
            )

        def final(person_id: str) -> str:
            while persons[person_id].merged_into is not None:
                person_id = persons[person_id].merged_into  # type: ignore[assignment]
            return person_id

        def merge(a: str, b: str, rule: str, key: str, ts: datetime) -> str:
            survivor, loser = sorted((persons[a], persons[b]), key=lambda p: p.age)
            for id_type, values in loser.ids.items():
                survivor.ids.setdefault(id_type, set()).update(values)
                for value in values:
                    identifier = Identifier(id_type, value)
                    owner[identifier] = survivor.person_id
                    link = new_links.get(identifier)
                    new_links[identifier] = (survivor.person_id, *(link[1:] if link else (key, ts)))
            loser.merged_into = survivor.person_id
            loser.ids = {}
            merged[loser.person_id] = survivor.person_id
            dirty_persons.update((survivor.person_id, loser.person_id))
            touched.add(survivor.person_id)
            record("merge", survivor.person_id, loser.person_id, rule, key, ts)
            return survivor.person_id

        for key, ts, ids in items:
            event_ids: dict[str, set[str]] = {}
            for identifier in ids:
                event_ids.setdefault(identifier.type, set()).add(identifier.value)
            known = sorted(
                (
                    (STRENGTH.get(i.type, 9), persons[owner[i]].age, owner[i], i)
                    for i in ids
                    if i in owner
                ),
            )
            target: str | None = None
            for _, _, linked, identifier in known:
                person_id = final(linked)  # an earlier merge in this event may have moved it
                if person_id == target:
                    continue
                if target is None:
                    if self._fits(persons[person_id].ids, event_ids):
                        target = person_id
                    else:
                        record("conflict", person_id, None, f"limit:{identifier.type}", key, ts)
                elif self._fits(persons[target].ids, persons[person_id].ids):
                    target = merge(target, person_id, f"shared:{identifier.type}", key, ts)
                else:
                    record("conflict", target, person_id, f"limit:{identifier.type}", key, ts)
            if target is None:
                target = person_id_for(key)
                if target not in persons:
                    persons[target] = Person(target, ts, key)
                    dirty_persons.add(target)
                    record("person_created", target, None, "new", key, ts)
            person = persons[target]
            for identifier in ids:
                if identifier in owner:
                    continue
                values = person.ids.setdefault(identifier.type, set())
                if len(values) >= self.limits.get(identifier.type, 1_000_000):
                    record("conflict", target, None, f"limit:{identifier.type}", key, ts)
                    continue
                values.add(identifier.value)
                owner[identifier] = target
                new_links[identifier] = (target, key, ts)
                touched.add(target)
            assigned.append(target)

        merged = {loser: final(loser) for loser in merged}
        self._store(new_links, [persons[p] for p in dirty_persons], log)
        return Resolution(
            person_of=[final(p) for p in assigned],
            merged=merged,
            touched={final(p) for p in touched},
            log=log,
        )

    def _store(
        self,
        links: dict[Identifier, tuple[str, str, datetime]],
        persons: list[Person],
        log: list[dict[str, Any]],
    ) -> None:
        if links:
            self._insert(
                "id_links",
                {
                    "id_type": [i.type for i in links],
                    "id_value": [i.value for i in links],
                    "person_id": [v[0] for v in links.values()],
                    "event_key": [v[1] for v in links.values()],
                    "ts": [v[2] for v in links.values()],
                },
            )
        if persons:
            self._insert(
                "persons",
                {
                    "person_id": [p.person_id for p in persons],
                    "first_ts": [p.first_ts for p in persons],
                    "first_event": [p.first_event for p in persons],
                    "merged_into": [p.merged_into for p in persons],
                },
            )
        if log:
            self._insert("identity_log", {k: [e[k] for e in log] for k in log[0]}, replace=False)

    def _insert(self, table: str, columns: dict[str, list[Any]], replace: bool = True) -> None:
        self.conn.register("_graph_rows", pa.table(columns))
        try:
            verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
            self.conn.execute(f"{verb} INTO {table} BY NAME SELECT * FROM _graph_rows")
        finally:
            self.conn.unregister("_graph_rows")

    def person_of(self, identifier: Identifier) -> str | None:
        """The person an identifier belongs to now, or None."""
        rows = self.conn.execute(
            "SELECT person_id FROM id_links WHERE id_type = ? AND id_value = ?",
            [identifier.type, identifier.value],
        ).fetchall()
        return rows[0][0] if rows else None
