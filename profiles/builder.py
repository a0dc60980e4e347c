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

from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from consent.gate import event_country
from consent.policy import PurposePolicy
from identity.normalise import Identifier
from identity.records import STRONG_FIELDS
from profiles.traits import (
    SEEN,
    Totals,
    TraitCatalog,
    accumulate,
    load_traits,
    merge_identify_trait,
    rolled_columns,
    rollup,
    rollup_plan,
)

# One accumulator row: its key (record, ingestion purpose, jurisdiction, trait, bucket), the
# person of its record, and the sums `profiles/traits.py` rolls up.
_ACCUMULATOR_COLUMNS = """
    person_id VARCHAR NOT NULL, record_id VARCHAR NOT NULL, purpose VARCHAR NOT NULL,
    jurisdiction VARCHAR NOT NULL, trait VARCHAR NOT NULL, bucket VARCHAR NOT NULL, n BIGINT,
    amount DECIMAL(18, 2), first_ts TIMESTAMPTZ, last_ts TIMESTAMPTZ, value JSON, last_key VARCHAR
"""
SCHEMA_SQL = f"""
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
-- Computed-trait accumulators (profiles/traits.py): one row per identity record, ingestion
-- purpose, jurisdiction, trait and bucket; events add to them, merges and splits move them.
-- The key is kept unique by `_FOLD` alone: no index (maintaining an index on five strings
-- cost twice a join over the whole table, at 170k and at 3M rows).
CREATE TABLE IF NOT EXISTS trait_state ({_ACCUMULATOR_COLUMNS});
-- Each batch's sums per key, appended (`_STATE_APPEND`): a batch writes only the table's
-- tail, where updating `trait_state` in place rewrote row groups across the whole table at
-- every commit and checkpoint (a fill's cost grew with the store). Folded into
-- `trait_state` once they pass a share of it (`ProfileBuilder.fold`); until then a key may
-- have rows in both, and in several batches.
CREATE TABLE IF NOT EXISTS trait_deltas ({_ACCUMULATOR_COLUMNS});
-- Every accumulator row, folded or not: what reads sum. Each key's totals are the sums,
-- least first and greatest last time, and the value and key of the latest (time, key) of
-- its rows (a key's value is set on all of its rows or on none).
CREATE OR REPLACE VIEW trait_rows AS
SELECT * FROM trait_state UNION ALL SELECT * FROM trait_deltas;
"""
# The tables holding accumulator rows: merges and splits move both (erasures delete from both).
TRAIT_TABLES = ("trait_state", "trait_deltas")
# One batch's accumulator rows summed per key (`ProfileBuilder._accumulate`): the events
# counted, their amount (0 without one), first and last time, the key and value of the
# latest (time, key) event, and the person of the batch's first event on that key; appended.
# `latest` numbers the batch's events by (time, key): an integer to order by, where a
# (time, key) struct cost a third of the statement.
_STATE_APPEND = """
INSERT INTO trait_deltas BY NAME
SELECT arg_min(e.person_id, e.event) AS person_id, e.record_id, e.purpose, e.jurisdiction,
       r.trait, r.bucket, count(*) AS n, coalesce(sum(r.amount), 0) AS amount,
       min(e.ts) AS first_ts, max(e.ts) AS last_ts,
       arg_max(r.value, e.latest) AS value, arg_max(e.event_key, e.latest) AS last_key
FROM _trait_rows r JOIN _trait_events e USING (event)
GROUP BY e.record_id, e.purpose, e.jurisdiction, r.trait, r.bucket
"""
# A fold of the deltas of one slice of the records (`{slice}`, a condition on `record_id`),
# in four statements. `_fold_sums`: the deltas summed per key (the person of the latest
# appended row). `_fold_merged`: each key also in `trait_state`, its folded row added to
# (the `rowid` of the row it replaces). That row is deleted, and the merged and the
# new keys' rows are appended: a MERGE updating rows in place cost 3.7x as much (its
# checkpoint rewrote every row group the updates fell in: all of them).
_KEY = "record_id, purpose, jurisdiction, trait, bucket"
_NEWER = "(x.last_ts > s.last_ts OR (x.last_ts = s.last_ts AND x.last_key > s.last_key))"
_FOLD = (
    f"""CREATE OR REPLACE TEMP TABLE _fold_sums AS
    SELECT arg_max(person_id, rowid) AS person_id, {_KEY}, sum(n)::BIGINT AS n,
           sum(amount)::DECIMAL(18, 2) AS amount, min(first_ts) AS first_ts,
           max(last_ts) AS last_ts, arg_max(value, (last_ts, last_key)) AS value,
           arg_max(last_key, (last_ts, last_key)) AS last_key
    FROM trait_deltas WHERE {{slice}} GROUP BY {_KEY}""",
    f"""CREATE OR REPLACE TEMP TABLE _fold_merged AS
    SELECT x.person_id, {_KEY}, s.n + x.n AS n, s.amount + x.amount AS amount,
           least(s.first_ts, x.first_ts) AS first_ts, greatest(s.last_ts, x.last_ts) AS last_ts,
           CASE WHEN {_NEWER} THEN coalesce(x.value, s.value)
                ELSE coalesce(s.value, x.value) END AS value,
           CASE WHEN {_NEWER} THEN x.last_key ELSE s.last_key END AS last_key,
           s.rowid AS folded
    FROM trait_state s JOIN _fold_sums x USING ({_KEY})""",
    "DELETE FROM trait_state WHERE rowid IN (SELECT folded FROM _fold_merged)",
    f"""INSERT INTO trait_state BY NAME
    SELECT * EXCLUDE (folded) FROM _fold_merged
    UNION ALL BY NAME SELECT * FROM _fold_sums ANTI JOIN _fold_merged USING ({_KEY})""",
)
# Deltas are folded once they hold this share of the folded rows' count (and at least
# `FOLD_MIN_ROWS`): each fold's pass over the table is then paid by as many appended rows,
# and reads go over at most that share more rows than folded.
FOLD_SHARE = 0.5
FOLD_MIN_ROWS = 200_000
# A due fold is spread over this many batches, each folding the deltas of one slice of the
# records (by hash of record id; a key's rows are all in one slice): no batch pays for the
# whole fold or holds all of the deltas' sums in memory at once. Each slice's fold joins
# its sums against the whole table: more slices bound a batch's share lower, for more in all.
FOLD_SLICES = 4

# A view's computed traits summed per trait in SQL (`Totals`): per (view, trait, bucket)
# first, then per trait, or per day after the view's horizon for windowed traits. Only the
# columns a trait's rollup reads are filled: turning every stored row's times and amounts
# into Python objects cost more than the query. Lists come in no order (`rollup` sorts
# them), and only for one view of each set of views that allow the same groups. Views are
# `_ag_shared`'s integer ids: grouping ~140k rows on an integer instead of the person and
# scope strings cut a fifth of the query.
_ROLLUP = f"""
WITH horizons AS (  -- windows keep the days after the view's last event less the longest window
    SELECT a.view,
           strftime(timezone('UTC', max(s.last_ts))::DATE - $max_window, '%Y-%m-%d') AS horizon
    FROM _person_rows s JOIN _ag_shared a USING (record_id, purpose, jurisdiction)
    WHERE s.trait = '{SEEN}' AND s.bucket = '' GROUP BY ALL
), buckets AS (
    SELECT a.view, s.trait, s.bucket, sum(s.n)::BIGINT AS n,
           CASE WHEN list_contains($windowed, s.trait) THEN split_part(s.bucket, '|', 1) END AS day,
           sum(s.amount) FILTER (WHERE list_contains($amounts, s.trait)) AS amount,
           min(s.first_ts) FILTER (WHERE list_contains($firsts, s.trait)) AS first_ts,
           max(s.last_ts) FILTER (WHERE list_contains($lasts, s.trait)) AS last_ts,
           arg_max(s.value, (s.last_ts, s.last_key))
               FILTER (WHERE list_contains($values, s.trait)) AS value
    FROM _person_rows s JOIN _ag_shared a USING (record_id, purpose, jurisdiction)
    LEFT JOIN horizons h ON h.view = a.view
    WHERE (s.trait <> '{SEEN}' OR $read_seen)  -- the groups' own rows, for `SEEN`'s twins
      AND (NOT list_contains($windowed, s.trait)
           OR split_part(s.bucket, '|', 1) > coalesce(h.horizon, ''))
    GROUP BY a.view, s.trait, s.bucket  -- `day` follows from these
), days AS (
    SELECT view, trait, day,
           sum(CASE WHEN list_contains($day_sums, trait) THEN n ELSE 1 END)::BIGINT AS n
    FROM buckets WHERE day IS NOT NULL GROUP BY ALL
)
SELECT view, trait, sum(n)::BIGINT AS n, count(*)::BIGINT AS buckets,
       timezone('UTC', min(first_ts)) AS first_ts, timezone('UTC', max(last_ts)) AS last_ts,
       any_value(value) AS value,  -- a latest trait has one bucket, ''
       list(bucket) FILTER (WHERE list_contains($keyed, trait)) AS keys,
       list(n) FILTER (WHERE list_contains($keyed, trait)) AS counts,
       list(amount) FILTER (WHERE list_contains($amounts, trait)) AS amounts
FROM buckets WHERE day IS NULL GROUP BY ALL
UNION ALL BY NAME
SELECT view, trait, list(day) AS keys, list(n) AS counts FROM days GROUP BY ALL
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
    stated = _dict(event.get("context")).get("traits")
    identify = event.get("type") == "identify"
    if not stated and not identify:
        return {}  # most events: nothing to gather
    traits = dict(_dict(stated))
    if identify:
        traits.update(_dict(event.get("traits")))
    return {k: v for k, v in traits.items() if v is not None and v != ""}


class ProfileBuilder:
    """Facts in DuckDB and the SQL that aggregates them into profiles, a batch at a time."""

    def __init__(
        self,
        conn: duckdb.DuckDBPyConnection,
        policy: PurposePolicy,
        traits: TraitCatalog | None = None,
    ) -> None:
        self.conn = conn
        self.policy = policy
        # Persons -> their identity records and strong identifiers (an Arrow table), or None:
        # the identity resolver's in-memory index, set by the pipeline; else `id_records`.
        self.records_of: Callable[[list[str]], pa.Table | None] = lambda _persons: None
        # Persons -> those merged into each (sorted; only persons with some), or None: the
        # identity resolver's in-memory index, set by the pipeline; else `id_persons`.
        self.merged_into: Callable[[list[str]], dict[str, list[str]] | None] = lambda _p: None
        self.traits = traits or load_traits(known_kinds=set(policy.event_purposes))
        conn.execute(SCHEMA_SQL)
        self._folded_rows = self._count("trait_state")
        self._delta_rows = self._count("trait_deltas")
        self._unfolded: list[int] = []  # the slices a fold under way has still to fold
        # Traits read through another's rows (their own rows are never read): window
        # twins through the trait they twin, and `SEEN`'s twins through `SEEN`.
        self._read_through = dict(self.traits.window_twins)
        self._fill_window_twins()
        self._rolled_columns = rolled_columns(self.traits)
        self._twins = sorted(self._read_through)
        if any(source == SEEN for source in self._read_through.values()):
            self._rolled_columns["firsts"] = sorted({*self._rolled_columns["firsts"], SEEN})
            self._rolled_columns["lasts"] = sorted({*self._rolled_columns["lasts"], SEEN})
        self._rolled_columns["read_seen"] = SEEN in self._read_through.values()
        self._rollup_plan = rollup_plan(self.traits, self._read_through)
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
        # Both fixed for the builder's life: registered once, not in every batch's rebuild
        # (a registration and its removal cost ~1 ms of catalogue work each time).
        conn.register("_consent_defaults", self._defaults)
        conn.register("_views", pa.table({"scope": list(self.policy.purposes)}))

    def _fill_window_twins(self) -> None:
        """Give each windowed trait its window twins' whole history.

        Twins (`TraitCatalog.window_twins`) add every event to the same daily buckets, so
        they hold the same rows, unless one joined the catalog after events were stored:
        it lacks their rows, and so would every twin rolled up through it. A twin behind
        the fullest of its family (fewer events counted) gets that one's rows, which is
        what a rebuild from every event would give it. `SEEN`'s twins
        (`TraitCatalog.seen_twins`) are read through `SEEN` when their history is its own.
        """
        families: dict[str, list[str]] = {}
        for twin, first in self.traits.window_twins.items():
            families.setdefault(first, [first]).append(twin)
        seen_twins = self.traits.seen_twins
        if not families and not seen_twins:
            return
        counted = dict(
            self.conn.execute(
                """SELECT trait, sum(n)::BIGINT FROM trait_rows
                   WHERE trait IN (SELECT unnest(?)) GROUP BY trait""",
                [[name for names in families.values() for name in names] + [SEEN, *seen_twins]],
            ).fetchall()
        )
        # `SEEN`'s twins count every event as `SEEN` does: one that counted as many holds
        # the same rows (one that joined the catalog after events were stored counted
        # fewer, and keeps reading its own).
        for name in seen_twins:
            if counted.get(name, 0) == counted.get(SEEN, 0):
                self._read_through[name] = SEEN
        behind: list[tuple[str, str]] = []  # (twin, the fullest of its family)
        for names in families.values():
            fullest = max(names, key=lambda name: (counted.get(name, 0), name))
            behind += [(n, fullest) for n in names if counted.get(n, 0) < counted.get(fullest, 0)]
        if not behind:
            return
        self.fold()  # the copies below take one row per key, from `trait_state` alone
        for name, fullest in behind:
            self.conn.execute("DELETE FROM trait_state WHERE trait = ?", [name])
            self.conn.execute(
                """INSERT INTO trait_state BY NAME
                   SELECT * REPLACE (?::VARCHAR AS trait) FROM trait_state WHERE trait = ?""",
                [name, fullest],
            )
        self._folded_rows = self._count("trait_state")

    def _count(self, table: str) -> int:
        ((rows,),) = self.conn.execute(f"SELECT count(*) FROM {table}").fetchall()
        return rows

    def _insert(self, table: str, rows: list[dict[str, Any]], schema: pa.Schema) -> set[str]:
        """Insert rows not already there; out: the event keys that were new."""
        if not rows:
            return set()
        self.conn.register("_builder_rows", pa.Table.from_pylist(rows, schema=schema))
        try:
            return {
                key
                for (key,) in self.conn.execute(
                    f"INSERT OR IGNORE INTO {table} BY NAME SELECT * FROM _builder_rows "
                    "RETURNING event_key"
                ).fetchall()
            }
        finally:
            self.conn.unregister("_builder_rows")

    def add(self, applied: list[tuple[str, str, str, dict[str, Any], datetime, str]]) -> set[str]:
        """Record applied events as facts and add them to their computed-trait accumulators.

        In: (event_key, person_id, kind, event, ts, identity record id) per event. Out: the
        persons whose profiles changed. An event already recorded adds nothing again.
        """
        facts, traits = [], []
        for event_key, person_id, kind, event, stated_ts, record_id in applied:
            # The same instant with datetime.UTC itself: pyarrow converts datetimes of any
            # other tzinfo object (the contract's own UTC included) ~60x slower.
            ts = stated_ts.astimezone(UTC)
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
        new = self._insert("facts", facts, _FACTS)
        self._accumulate(
            [
                (fact, event)
                for fact, (*_, event, _ts, _record_id) in zip(facts, applied, strict=True)
                if fact["event_key"] in new
            ]
        )
        self._insert("trait_facts", traits, _TRAITS)
        return {person for _, person, *_ in applied}

    def _accumulate(self, events: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
        """Add events to the accumulator rows they touch: one append per batch.

        Python lists each event's (trait, bucket, amount, value) rows; DuckDB sums them per
        key and appends the sums to `trait_deltas` (summing Python tuples cost more).
        """
        rows: list[tuple[str, str, Decimal | None, Any]] = []
        event_of: list[int] = []  # each row's event, by position in `events`
        for number, (fact, event) in enumerate(events):
            added = accumulate(self.traits, fact["kind"], event, fact["ts"], fact["event_key"])
            rows += added
            event_of += [number] * len(added)
        if not rows:
            return
        traits, buckets, amounts, values = zip(*rows, strict=True)
        facts = [fact for fact, _ in events]
        latest = [0] * len(facts)
        for rank, number in enumerate(
            sorted(range(len(facts)), key=lambda i: (facts[i]["ts"], facts[i]["event_key"]))
        ):
            latest[number] = rank
        trait_events = pa.table(
            {
                "event": pa.array(range(len(facts)), pa.int32()),
                "latest": pa.array(latest, pa.int32()),
                "person_id": [f["person_id"] for f in facts],
                "record_id": [f["record_id"] for f in facts],
                "purpose": [f["purpose"] or "" for f in facts],
                "jurisdiction": [f["jurisdiction"] or "" for f in facts],
                "ts": pa.array([f["ts"] for f in facts], pa.timestamp("us", tz="UTC")),
                "event_key": [f["event_key"] for f in facts],
            }
        )
        trait_rows = pa.table(
            {
                "event": pa.array(event_of, pa.int32()),
                "trait": pa.array(traits, pa.string()),
                "bucket": pa.array(buckets, pa.string()),
                "amount": pa.array(amounts, pa.decimal128(18, 2)),
                "value": pa.array(
                    [None if v is None else orjson.dumps(v).decode() for v in values], pa.string()
                ),
            }
        )
        self.conn.register("_trait_events", trait_events)
        self.conn.register("_trait_rows", trait_rows)
        try:
            ((appended,),) = self.conn.execute(_STATE_APPEND).fetchall()
        finally:
            self.conn.unregister("_trait_events")
            self.conn.unregister("_trait_rows")
        self._delta_rows += appended
        self._fold_step()

    def _fold_step(self) -> None:
        """Fold the next slice of a fold under way, or start one if the deltas are due."""
        if not self._unfolded:
            if self._delta_rows < max(FOLD_MIN_ROWS, FOLD_SHARE * self._folded_rows):
                return
            self._unfolded = list(range(FOLD_SLICES))
        self._fold_slice(self._unfolded.pop(0), FOLD_SLICES)

    def _fold_slice(self, part: int, parts: int) -> None:
        """Add the appended rows of records in slice `part` of `parts` into `trait_state`
        and delete them from `trait_deltas`, in the caller's transaction: what reads of
        `trait_rows` sum stays the same."""
        where = "true" if parts == 1 else f"hash(record_id) % {parts} = {part}"
        for statement in _FOLD:
            self.conn.execute(statement.format(slice=where))
        ((folded,),) = self.conn.execute(f"DELETE FROM trait_deltas WHERE {where}").fetchall()
        self.conn.execute("DROP TABLE _fold_sums; DROP TABLE _fold_merged")
        self._folded_rows = self._count("trait_state")
        self._delta_rows -= folded

    def fold(self) -> None:
        """Add all appended accumulator rows into `trait_state` (one row per key there) and
        empty `trait_deltas`; what reads of `trait_rows` sum stays the same."""
        self._fold_slice(0, 1)
        self._unfolded = []
        self._delta_rows = 0

    def repoint(self, merged: dict[str, str]) -> None:
        """Move the facts of merged-away persons to the persons they merged into."""
        if not merged:
            return
        remap = pa.table({"loser": list(merged), "survivor": list(merged.values())})
        self.conn.register("_remap", remap)
        try:
            for table in ("facts", "trait_facts", *TRAIT_TABLES):
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
            for table in ("facts", "trait_facts", *TRAIT_TABLES):
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
        if not by_type:
            return set()
        # One pass over the stored records for every type (a query per type scanned them
        # each time), each type's values a hash semi-join: `list_contains` searched the
        # whole list at every stored record. Only the records found are then given their
        # current person as `id_records` does (identity/resolver.py), not every moved record.
        held = " OR ".join(f"{id_type} IN (SELECT unnest(?))" for id_type in by_type)
        return {
            person
            for (person,) in self.conn.execute(
                f"""WITH held AS (SELECT record_id, person_id FROM id_records_base WHERE {held})
                SELECT DISTINCT coalesce(m.person_id, h.person_id) FROM held h LEFT JOIN (
                    SELECT record_id, arg_max(person_id, seq) AS person_id FROM id_record_moves
                    WHERE record_id IN (SELECT record_id FROM held) GROUP BY record_id
                ) m USING (record_id)""",
                list(by_type.values()),
            ).fetchall()
        }

    def build(self, persons: set[str]) -> dict[str, dict[str, Any]]:
        """Aggregate the current profile of each person from their facts and identifiers.

        Views of a person that allow the same rows share their identifiers, traits, computed
        and windows objects (and window twins their days): a built profile is read
        (published, matched to segments), never changed.
        """
        if not persons:
            return {}
        affected = sorted(persons)
        self.conn.register("_affected", pa.table({"person_id": affected}))
        try:
            return self._build(affected)
        finally:
            self.conn.unregister("_affected")
            self.conn.unregister("_person_rows")

    def _allowed_groups(self, affected: list[str]) -> None:
        """`_person_rows` (Arrow, registered until `build` returns): the affected persons'
        accumulator rows; `_affected_records`: their identity records; `_ids`: each affected
        person's identifiers, by record; `_ag`: each affected person's accumulator group once
        per view it may appear in; `_shared_views`: the view whose roll-up each view shares;
        `_ag_shared`: `_ag` of those, each view numbered (`view`).

        A group is (identity record, ingestion purpose, jurisdiction). It belongs in the view
        for purpose P when the person currently consents to P and to the ingestion purpose:
        their identifiers' latest statement, else the jurisdiction's default.
        """
        q = self.conn.execute
        # The affected persons' accumulator rows, read once into Arrow: every read of
        # `trait_rows` decodes the whole table (a person's rows lie anywhere in it), and a
        # temporary table cost twice the Arrow copy to write. The groups below and the
        # roll-up read them. A record's rows all carry its current person (appends take
        # the batch's final person; merges and splits move all of a person's or a
        # record's rows). Only latest traits keep a row's value and key; the other rows
        # have them set to NULL in the same pass: one scan of both tables, where two (one
        # without value and key, one for latest traits) cost 1.5x as much for 10,000
        # stored persons of a 300,000-person store.
        person_rows = self.conn.sql(
            """SELECT * REPLACE (
                   CASE WHEN list_contains($values, trait) THEN value END AS value,
                   CASE WHEN list_contains($values, trait) THEN last_key END AS last_key)
               FROM trait_rows
               WHERE person_id IN (SELECT person_id FROM _affected)
                 AND NOT list_contains($twins, trait)""",
            params={"twins": self._twins, "values": self._rolled_columns["values"]},
        ).to_arrow_reader()
        self.conn.register("_person_rows", person_rows.read_all())
        held = self.records_of(affected)
        if held is not None:  # no read of the store, whose size it would cost
            self.conn.register("_held_records", held)
            try:
                q("CREATE OR REPLACE TEMP TABLE _affected_records AS FROM _held_records")
            finally:
                self.conn.unregister("_held_records")
        else:
            # `id_records` is a view that works out every record's current person: read once.
            q(
                f"""CREATE OR REPLACE TEMP TABLE _affected_records AS
                SELECT person_id, record_id, {", ".join(STRONG_FIELDS)} FROM id_records
                WHERE person_id IN (SELECT person_id FROM _affected)"""
            )
        q(
            f"""CREATE OR REPLACE TEMP TABLE _ids AS SELECT * FROM (
                UNPIVOT _affected_records ON {", ".join(STRONG_FIELDS)} INTO NAME id_type VALUE id_value)"""
        )
        q(
            f"""CREATE OR REPLACE TEMP TABLE _ag AS
            WITH ids AS (
                SELECT DISTINCT person_id, id_type, id_value FROM _ids
            ), latest AS (  -- a person's consent: their identifiers' latest statement
                SELECT i.person_id, s.purpose, arg_max(s.status, s.ts) AS status
                FROM ids i JOIN consent_state s USING (id_type, id_value) GROUP BY ALL
            ), groups AS (
                SELECT DISTINCT person_id, record_id, purpose, jurisdiction FROM _person_rows
                WHERE trait = '{SEEN}' AND bucket = ''
            )
            SELECT v.scope, g.* FROM groups g CROSS JOIN _views v
            LEFT JOIN latest lv ON lv.person_id = g.person_id AND lv.purpose = v.scope
            LEFT JOIN _consent_defaults dv
                   ON dv.jurisdiction = g.jurisdiction AND dv.purpose = v.scope
            LEFT JOIN latest lp ON lp.person_id = g.person_id AND lp.purpose = g.purpose
            LEFT JOIN _consent_defaults dp
                   ON dp.jurisdiction = g.jurisdiction AND dp.purpose = g.purpose
            WHERE coalesce(lv.status, dv.status, 'denied') = 'granted'
              AND (g.purpose = '' OR coalesce(lp.status, dp.status, 'denied') = 'granted')
            UNION ALL BY NAME  -- what is held, consent aside: a subject access request's view
            SELECT '{SUBJECT_ACCESS}' AS scope, g.* FROM groups g"""
        )
        # Views of a person that allow the same groups add up the same rows (consent
        # mostly agrees across purposes): each set is rolled up once, for its first scope.
        # A view's groups as one sorted list of joined strings (the unit separator is in
        # no identifier, purpose or jurisdiction): grouping on it, then joining back,
        # costs less than sorting structs and partitioning a window by them.
        q(
            """CREATE OR REPLACE TEMP TABLE _shared_views AS
            WITH views AS (
                SELECT person_id, scope,
                       list_sort(list(concat_ws(chr(31), record_id, purpose, jurisdiction)))
                           AS groups
                FROM _ag GROUP BY ALL
            )
            SELECT v.person_id, v.scope, s.shared FROM views v
            JOIN (SELECT person_id, groups, min(scope) AS shared FROM views GROUP BY ALL) s
            USING (person_id, groups)"""
        )
        q(
            """CREATE OR REPLACE TEMP TABLE _ag_shared AS
            SELECT a.*, dense_rank() OVER (ORDER BY a.person_id, a.scope)::INTEGER AS view
            FROM _ag a SEMI JOIN _shared_views v
            ON v.person_id = a.person_id AND v.scope = a.scope AND v.shared = a.scope"""
        )

    def _stated(
        self, by_name: dict[str, list[tuple[datetime, str, str]]]
    ) -> dict[str, dict[str, Any]]:
        """A view's identify traits from their allowed (UTC ts, event key, JSON value), by
        strategy; each trait's values in (ts, event key) order.

        The times come naive (UTC wall time): DuckDB turns a TIMESTAMPTZ into an aware
        datetime through pytz, which cost more than the query that read them. Values are
        parsed only where the strategy reads them: the latest or first value alone."""
        traits = {}
        strategy_of = self.traits.strategy
        for name, values in by_name.items():
            ts, event_key, last = values[-1]  # they come in (ts, event key) order
            strategy = strategy_of(name)
            if strategy == "latest":
                value = orjson.loads(last)
            elif strategy == "first":
                value = orjson.loads(values[0][2])
            else:
                value = merge_identify_trait(
                    strategy, [(t, k, orjson.loads(v)) for t, k, v in values], ordered=True
                )
            traits[name] = {"value": value, "ts": ts.isoformat() + "+00:00", "event_key": event_key}
        return traits

    def _merged_from(self, affected: list[str]) -> dict[str, list[str]]:
        """Each affected person's merged-in persons, sorted: the persons founded by a record
        now in this profile (`_affected_records`), other than itself. From the identity
        index when it has the founders: `id_persons` read whole grows with the store."""
        merged = self.merged_into(affected)
        if merged is not None:
            return merged
        return dict(
            self.conn.execute(
                """SELECT r.person_id, list(DISTINCT p.person_id ORDER BY p.person_id)
                   FROM id_persons p JOIN _affected_records r ON r.record_id = p.founder
                   WHERE p.person_id <> r.person_id GROUP BY r.person_id"""
            ).fetchall()
        )

    def _build(self, affected: list[str]) -> dict[str, dict[str, Any]]:
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
        self._allowed_groups(affected)
        shared = {
            (person, view): of for person, view, of in q("SELECT * FROM _shared_views").fetchall()
        }
        view_of = {
            number: (person, scope)
            for number, person, scope in q(
                "SELECT DISTINCT view, person_id, scope FROM _ag_shared"
            ).fetchall()
        }
        totals: dict[tuple[str, str], dict[str, Totals]] = {}
        for number, trait, *row in q(_ROLLUP, self._rolled_columns).fetchall():
            totals.setdefault(view_of[number], {})[trait] = Totals(*row)
        stated: dict[tuple[str, str], dict[str, list[tuple[datetime, str, str]]]] = {}
        for person, view, name, value, ts, event_key in q(
            """SELECT a.person_id, a.scope, t.name, t.value, timezone('UTC', t.ts), t.event_key
               FROM trait_facts t JOIN facts f USING (event_key)
               JOIN _ag_shared a ON a.record_id = f.record_id
                                AND a.purpose = coalesce(f.purpose, '')
                                AND a.jurisdiction = coalesce(f.jurisdiction, '')
               WHERE t.person_id IN (SELECT person_id FROM _affected)
               ORDER BY 1, 2, 3, 5, 6"""
        ).fetchall():
            by_name = stated.setdefault((person, view), {})
            by_name.setdefault(name, []).append((ts, event_key, value))
        # All identifiers index the profile for lookups; a view shows only those of records
        # that contributed an allowed event to it: the same for views that share a roll-up
        # (they allow the same groups), read once for those (`_ag_shared`).
        shown: dict[tuple[str, str], dict[str, list[str]]] = {}
        for person, scope, id_type, values in q(
            """SELECT person_id, scope, id_type, list(id_value ORDER BY id_value) FROM (
                   SELECT DISTINCT person_id, scope, id_type, id_value FROM _ids
                   JOIN (SELECT DISTINCT record_id, scope FROM _ag_shared) v USING (record_id)
               ) GROUP BY ALL
               UNION ALL  -- the profile's own (no scope): every identifier of its records
               SELECT person_id, NULL, id_type, list(DISTINCT id_value ORDER BY id_value)
               FROM _ids GROUP BY ALL
               ORDER BY 1, 2 NULLS FIRST, 3"""
        ).fetchall():
            if scope is not None:
                shown.setdefault((person, scope), {})[id_type] = values
            elif person in profiles:
                profiles[person]["identifiers"][id_type] = values
        rolled: dict[tuple[str, str], tuple[dict, dict, dict, dict]] = {}
        plan = self._rollup_plan
        for (person, view), of in sorted(shared.items()):
            # Every shared view has allowed groups (`_ag_shared`), even if none of their
            # rows feeds a computed trait.
            if person not in profiles:
                continue
            if (person, of) not in rolled:
                computed, windows = rollup(self.traits, totals.get((person, of), {}), plan)
                rolled[(person, of)] = (
                    shown.get((person, of), {}),
                    self._stated(stated.get((person, of), {})),
                    computed,
                    windows,
                )
            identifiers, traits, computed, windows = rolled[(person, of)]
            profiles[person]["views"][view] = {
                "identifiers": identifiers,
                "traits": traits,
                "computed": computed,
                "windows": windows,
            }
        for person, merged in self._merged_from(affected).items():
            if person in profiles:
                profiles[person]["merged_from"] = merged
        for person, version in q(
            """INSERT INTO profile_versions SELECT person_id, 1 FROM _affected
               ON CONFLICT (person_id) DO UPDATE SET version = profile_versions.version + 1
               RETURNING person_id, version"""
        ).fetchall():
            if person in profiles:
                profiles[person]["version"] = version
        return profiles
