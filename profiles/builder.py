"""The profile builder: applied events become facts, and facts become one profile per person.

Facts are kept per event (the state every profile is rebuilt from), so a merge is a
re-pointing of facts and a profile is always the aggregate of exactly its person's
events: no double counting across merges, and any profile can be rebuilt from scratch.

Reads are purpose-scoped, so a profile holds one view per purpose. Each fact keeps the
purpose its event was ingested for and its jurisdiction; a view for purpose P aggregates
only the facts whose person currently consents to P (and still to the ingestion purpose):
the latest statement for that purpose across the person's identifiers, else the policy
default of the fact's jurisdiction. A consent change rebuilds the person's views, so a
withdrawal republishes the profile without the withdrawn data.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from consent.gate import event_country
from consent.policy import PurposePolicy
from identity.normalise import Identifier
from identity.records import STRONG_FIELDS, record_id_of

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS facts (
    event_key VARCHAR PRIMARY KEY, person_id VARCHAR NOT NULL, record_id VARCHAR, kind VARCHAR NOT NULL,
    ts TIMESTAMPTZ NOT NULL, order_id VARCHAR, amount DECIMAL(18, 2), currency VARCHAR,
    ticket_id VARCHAR, score INTEGER, purpose VARCHAR, jurisdiction VARCHAR
);
CREATE TABLE IF NOT EXISTS trait_facts (
    event_key VARCHAR, person_id VARCHAR NOT NULL, record_id VARCHAR, name VARCHAR, value JSON,
    ts TIMESTAMPTZ,
    PRIMARY KEY (event_key, name)
);
CREATE TABLE IF NOT EXISTS profile_versions (person_id VARCHAR PRIMARY KEY, version BIGINT);
"""

_FACTS = pa.schema(
    [
        ("event_key", pa.string()),
        ("person_id", pa.string()),
        ("record_id", pa.string()),
        ("kind", pa.string()),
        ("ts", pa.timestamp("us", tz="UTC")),
        ("order_id", pa.string()),
        ("amount", pa.decimal128(18, 2)),
        ("currency", pa.string()),
        ("ticket_id", pa.string()),
        ("score", pa.int32()),
        ("purpose", pa.string()),
        ("jurisdiction", pa.string()),
    ]
)
_TRAITS = pa.schema(
    [
        ("event_key", pa.string()),
        ("person_id", pa.string()),
        ("record_id", pa.string()),
        ("name", pa.string()),
        ("value", pa.string()),
        ("ts", pa.timestamp("us", tz="UTC")),
    ]
)
CENT = Decimal("0.01")
# The view of everything held about a person (GDPR art. 15 access), readable by admins only.
SUBJECT_ACCESS = "subject_access"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def fact_of(
    event_key: str, person_id: str, kind: str, event: dict[str, Any], ts: datetime, record_id: str
) -> dict:
    """The fact row one applied event contributes (amounts exact, to the cent)."""
    props = _dict(event.get("properties"))
    # Only kinds whose contract types these fields read them: a page's free-form
    # properties may hold an "order_id" that is a number (found by the stream fuzz test).
    order = kind in ("order_completed", "order_refunded")
    ticket = kind in ("ticket_opened", "ticket_closed", "csat_submitted")
    amount = props.get("total") if order else None
    return {
        "event_key": event_key,
        "person_id": person_id,
        "record_id": record_id,
        "kind": kind,
        "ts": ts,
        "order_id": props.get("order_id") if order else None,
        "amount": Decimal(str(amount)).quantize(CENT) if amount is not None else None,
        "currency": props.get("currency") if order else None,
        "ticket_id": props.get("ticket_id") if ticket else None,
        "score": props.get("score") if kind == "csat_submitted" else None,
    }


def traits_of(event: dict[str, Any]) -> dict[str, Any]:
    """Traits an event states about its person: identify traits, then context.traits."""
    traits = dict(_dict(_dict(event.get("context")).get("traits")))
    if event.get("type") == "identify":
        traits.update(_dict(event.get("traits")))
    return {k: v for k, v in traits.items() if v is not None and v != ""}


class ProfileBuilder:
    """Facts in DuckDB and the SQL that aggregates them into profiles, a batch at a time."""

    def __init__(self, conn: duckdb.DuckDBPyConnection, policy: PurposePolicy) -> None:
        self.conn = conn
        self.policy = policy
        conn.execute(SCHEMA_SQL)
        # What silence means, per jurisdiction and purpose: the fallback of every view.
        self._defaults = pa.table(
            {
                "jurisdiction": [j for j in policy.jurisdictions for _ in policy.purposes],
                "purpose": [p for _ in policy.jurisdictions for p in policy.purposes],
                "status": [
                    policy.default_status(j, p)
                    for j in policy.jurisdictions
                    for p in policy.purposes
                ],
            }
        )

    def _insert(self, table: str, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
        if not rows:
            return
        self.conn.register("_builder_rows", pa.Table.from_pylist(rows, schema=schema))
        try:
            self.conn.execute(f"INSERT OR IGNORE INTO {table} BY NAME SELECT * FROM _builder_rows")
        finally:
            self.conn.unregister("_builder_rows")

    def add(
        self, applied: list[tuple[str, str, str, dict[str, Any], datetime, dict[str, Any]]]
    ) -> set[str]:
        """Record applied events as facts.

        In: (event_key, person_id, kind, event, ts, identity record) per event. Out: the
        persons whose profiles changed.
        """
        facts, traits = [], []
        for event_key, person_id, kind, event, ts, record in applied:
            record_id = record_id_of(record)
            fact = fact_of(event_key, person_id, kind, event, ts, record_id)
            fact["purpose"] = self.policy.purpose_for(kind)
            fact["jurisdiction"] = self.policy.jurisdiction_of(event_country(event))
            facts.append(fact)
            for name, value in traits_of(event).items():
                traits.append(
                    {
                        "event_key": event_key,
                        "person_id": person_id,
                        "record_id": record_id,
                        "name": str(name)[:128],
                        "value": orjson.dumps(value).decode(),
                        "ts": ts,
                    }
                )
        self._insert("facts", facts, _FACTS)
        self._insert("trait_facts", traits, _TRAITS)
        return {person for _, person, *_ in applied}

    def repoint(self, merged: dict[str, str]) -> None:
        """Move the facts of merged-away persons to the persons they merged into."""
        if not merged:
            return
        remap = pa.table({"loser": list(merged), "survivor": list(merged.values())})
        self.conn.register("_remap", remap)
        try:
            for table in ("facts", "trait_facts"):
                self.conn.execute(
                    f"UPDATE {table} SET person_id = r.survivor FROM _remap r "
                    f"WHERE {table}.person_id = r.loser"
                )
            self.conn.execute(
                "DELETE FROM profile_versions WHERE person_id IN (SELECT loser FROM _remap)"
            )
        finally:
            self.conn.unregister("_remap")

    def reassign(self, moved: dict[str, str]) -> None:
        """Move the facts of records a split moved to their new persons."""
        if not moved:
            return
        self.conn.register(
            "_moved_records",
            pa.table({"record_id": list(moved), "person_id": list(moved.values())}),
        )
        try:
            for table in ("facts", "trait_facts"):
                self.conn.execute(
                    f"UPDATE {table} SET person_id = m.person_id FROM _moved_records m "
                    f"WHERE {table}.record_id = m.record_id"
                )
        finally:
            self.conn.unregister("_moved_records")

    def persons_holding(self, identifiers: set[Identifier]) -> set[str]:
        """The persons whose identity records carry any of `identifiers` (consent subjects)."""
        by_type: dict[str, list[str]] = {}
        for identifier in identifiers:
            if identifier.type in STRONG_FIELDS:
                by_type.setdefault(identifier.type, []).append(identifier.value)
        persons: set[str] = set()
        for id_type, values in by_type.items():
            persons |= {
                row[0]
                for row in self.conn.execute(
                    f"SELECT DISTINCT person_id FROM id_records WHERE {id_type} IN (SELECT unnest(?))",
                    [values],
                ).fetchall()
            }
        return persons

    def build(self, persons: set[str]) -> dict[str, dict[str, Any]]:
        """Aggregate the current profile of each person from their facts and identifiers."""
        if not persons:
            return {}
        self.conn.register("_affected", pa.table({"person_id": sorted(persons)}))
        try:
            return self._build()
        finally:
            self.conn.unregister("_affected")

    def _allowed_facts(self) -> None:
        """`_vf`: each affected fact once per purpose view it may appear in, under current consent."""
        q = self.conn.execute
        self.conn.register("_consent_defaults", self._defaults)
        self.conn.register("_views", pa.table({"scope": list(self.policy.purposes)}))
        try:
            q(
                f"""CREATE OR REPLACE TEMP TABLE _vf AS
                WITH ids AS (
                    SELECT DISTINCT person_id, id_type, id_value FROM (
                        UNPIVOT (SELECT person_id, {", ".join(STRONG_FIELDS)} FROM id_records
                                 WHERE person_id IN (SELECT person_id FROM _affected))
                        ON {", ".join(STRONG_FIELDS)} INTO NAME id_type VALUE id_value)
                ), latest AS (  -- a person's consent: their identifiers' latest statement
                    SELECT i.person_id, s.purpose, arg_max(s.status, s.ts) AS status
                    FROM ids i JOIN consent_state s USING (id_type, id_value) GROUP BY ALL
                )
                SELECT v.scope, f.* FROM facts f CROSS JOIN _views v
                LEFT JOIN latest lv ON lv.person_id = f.person_id AND lv.purpose = v.scope
                LEFT JOIN _consent_defaults dv
                       ON dv.jurisdiction = f.jurisdiction AND dv.purpose = v.scope
                LEFT JOIN latest lp ON lp.person_id = f.person_id AND lp.purpose = f.purpose
                LEFT JOIN _consent_defaults dp
                       ON dp.jurisdiction = f.jurisdiction AND dp.purpose = f.purpose
                WHERE f.person_id IN (SELECT person_id FROM _affected)
                  AND coalesce(lv.status, dv.status, 'denied') = 'granted'
                  AND (f.purpose IS NULL OR coalesce(lp.status, dp.status, 'denied') = 'granted')
                UNION ALL BY NAME  -- what is held, consent aside: a subject access request's view
                SELECT '{SUBJECT_ACCESS}' AS scope, f.* FROM facts f
                WHERE f.person_id IN (SELECT person_id FROM _affected)"""
            )
        finally:
            self.conn.unregister("_consent_defaults")
            self.conn.unregister("_views")

    def _build(self) -> dict[str, dict[str, Any]]:
        q = self.conn.execute
        profiles: dict[str, dict[str, Any]] = {
            person: {
                "person_id": person,
                "identifiers": {},
                "views": {},
                "merged_from": [],
            }
            for (person,) in q(
                "SELECT DISTINCT person_id FROM facts WHERE person_id IN (SELECT person_id FROM _affected)"
            ).fetchall()
        }
        self._allowed_facts()
        rows = q(
            """SELECT person_id, scope, count(*), min(ts), max(ts),
                      count(DISTINCT order_id) FILTER (WHERE kind = 'order_completed'),
                      count(*) FILTER (WHERE kind = 'order_refunded'),
                      list(DISTINCT ticket_id) FILTER (WHERE kind = 'ticket_opened'),
                      list(DISTINCT ticket_id) FILTER (WHERE kind = 'ticket_closed'),
                      arg_max(score, ts) FILTER (WHERE kind = 'csat_submitted')
               FROM _vf GROUP BY person_id, scope"""
        ).fetchall()
        views: dict[tuple[str, str], dict[str, Any]] = {}
        for person, view, events, first, last, orders, refunds, opened, closed, csat in rows:
            views[(person, view)] = profiles[person]["views"][view] = {
                "identifiers": {},
                "traits": {},
                "computed": {
                    "event_count": events,
                    "first_seen": first.isoformat(),
                    "last_seen": last.isoformat(),
                    "order_count": orders,
                    "refund_count": refunds,
                    "lifetime_value": {},
                    "open_tickets": len(set(opened or ()) - set(closed or ())),
                    "last_csat": csat,
                },
            }
        # Each order counts once (by order_id) however often it was sent; every refund counts.
        for person, view, currency, value in q(
            """WITH orders AS (
                   SELECT person_id, scope, order_id, any_value(currency) AS currency,
                          any_value(amount) AS amount
                   FROM _vf WHERE kind = 'order_completed'
                   GROUP BY person_id, scope, order_id
               ), refunds AS (
                   SELECT person_id, scope, currency, -amount AS amount FROM _vf
                   WHERE kind = 'order_refunded'
               )
               SELECT person_id, scope, currency, sum(amount) FROM (
                   SELECT person_id, scope, currency, amount FROM orders
                   UNION ALL SELECT * FROM refunds
               ) GROUP BY ALL ORDER BY person_id, scope, currency"""
        ).fetchall():
            views[(person, view)]["computed"]["lifetime_value"][currency] = float(value)
        for person, view, name, value, ts, event_key in q(
            """SELECT t.person_id, v.scope, t.name, max_by(t.value, (t.ts, t.event_key)), max(t.ts),
                      max_by(t.event_key, (t.ts, t.event_key))
               FROM trait_facts t JOIN _vf v USING (event_key)
               GROUP BY ALL ORDER BY 1, 2, 3"""
        ).fetchall():
            views[(person, view)]["traits"][name] = {
                "value": orjson.loads(value),
                "ts": ts.isoformat(),
                "event_key": event_key,
            }
        # All identifiers index the profile for lookups; a view shows only those of records
        # that contributed an allowed event to it.
        for person, view, id_type, values in q(
            f"""SELECT person_id, scope, id_type, list(DISTINCT id_value ORDER BY id_value) FROM (
                   UNPIVOT (SELECT r.person_id, v.scope, {", ".join("r." + f for f in STRONG_FIELDS)}
                            FROM id_records r LEFT JOIN (SELECT DISTINCT record_id, scope FROM _vf) v
                            USING (record_id)
                            WHERE r.person_id IN (SELECT person_id FROM _affected))
                   ON {", ".join(STRONG_FIELDS)} INTO NAME id_type VALUE id_value
               ) GROUP BY ALL ORDER BY 1, 2 NULLS FIRST, 3"""
        ).fetchall():
            if person not in profiles:
                continue
            known = profiles[person]["identifiers"].get(id_type, [])
            profiles[person]["identifiers"][id_type] = sorted(set(known) | set(values))
            if (person, view) in views:
                views[(person, view)]["identifiers"][id_type] = values
        for person, merged in q(
            # Persons that founded a record now in this profile: everyone merged into it.
            """SELECT r.person_id, list(DISTINCT p.person_id ORDER BY p.person_id)
               FROM id_persons p JOIN id_records r ON r.record_id = p.founder
               WHERE p.person_id <> r.person_id AND r.person_id IN (SELECT person_id FROM _affected)
               GROUP BY r.person_id"""
        ).fetchall():
            if person in profiles:
                profiles[person]["merged_from"] = merged
        q(
            """INSERT INTO profile_versions SELECT person_id, 1 FROM _affected
               ON CONFLICT (person_id) DO UPDATE SET version = profile_versions.version + 1"""
        )
        for person, version in q(
            "SELECT person_id, version FROM profile_versions WHERE person_id IN (SELECT person_id FROM _affected)"
        ).fetchall():
            if person in profiles:
                profiles[person]["version"] = version
        return profiles
