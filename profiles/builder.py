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
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from itertools import chain
from typing import Any, NamedTuple

import duckdb
import orjson
import pyarrow as pa
import pyarrow.compute as pc

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
-- Identify traits stated by events, with their event's ingestion purpose and jurisdiction
-- (as in `facts`), so a rebuild reads a view's traits without a join through `facts`.
CREATE TABLE IF NOT EXISTS trait_facts (
    event_key VARCHAR, person_id VARCHAR NOT NULL, record_id VARCHAR, name VARCHAR, value JSON,
    ts TIMESTAMPTZ, purpose VARCHAR, jurisdiction VARCHAR,
    PRIMARY KEY (event_key, name)
);
CREATE TABLE IF NOT EXISTS profile_versions (person_id VARCHAR PRIMARY KEY, version BIGINT);
-- Traits whose events add the same accumulator rows as another's (`TraitCatalog.row_families`)
-- and are read through that trait's rows (`source`) rather than written: since when decides
-- which history a trait has, so it is kept (`ProfileBuilder._settle_sources`).
CREATE TABLE IF NOT EXISTS trait_sources (trait VARCHAR PRIMARY KEY, source VARCHAR NOT NULL);
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
# (time, key) struct cost a third of the statement. Each row carries its event's columns
# (taken in Arrow), and the table is the caller's local `_trait_rows`, read by DuckDB's
# replacement scan: a join with a second table, and registering both, cost 1.2x as much.
_STATE_APPEND = """
INSERT INTO trait_deltas BY NAME
SELECT arg_min(person_id, event) AS person_id, record_id, purpose, jurisdiction,
       trait, bucket, count(*) AS n, coalesce(sum(amount), 0) AS amount,
       min(ts) AS first_ts, max(ts) AS last_ts,
       arg_max(value, latest) AS value, arg_max(event_key, latest) AS last_key
FROM _trait_rows
GROUP BY record_id, purpose, jurisdiction, trait, bucket
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


def _iso_utc(ts: str) -> str:
    """SQL for a TIMESTAMPTZ expression as Python's `isoformat()` of its naive UTC time, then
    "+00:00" (microseconds only when there are some): formatted by DuckDB, where fetching a
    datetime object (through a time-zone lookup, or naive) and formatting it in Python cost
    more than the query's own work with it."""
    utc = f"timezone('UTC', {ts})"
    return (
        f"(strftime({utc}, '%Y-%m-%dT%H:%M:%S') || CASE WHEN epoch_us({utc}) % 1000000 = 0 "
        f"THEN '' ELSE strftime({utc}, '.%f') END || '+00:00')"
    )


# A view's computed traits summed per trait in SQL (`Totals`): per (view, trait, bucket)
# first, then per trait, or per day after the view's horizon for windowed traits. Only the
# columns a trait's rollup reads are filled: turning every stored row's times and amounts
# into Python objects cost more than the query. Lists come in no order (`rollup` sorts
# them), and only for one view of each set of views that allow the same groups. Views are
# `_ag_shared`'s integer ids: grouping ~140k rows on an integer instead of the person and
# scope strings cut a fifth of the query. Each `_ag_shared` row carries its view's horizon
# (worked out with the groups): a second join of the rows to find it cost more. The lists
# come as JSON text (amounts as decimal strings), parsed by orjson: DuckDB's conversion of
# list values to Python objects cost three times as much. A windowed trait's bucket starts
# with its event's UTC day, always ten characters (`date.isoformat`, `accumulate`), then
# `|` and a value or nothing: its first ten characters, where `split_part` on `|` cost 8%
# of the statement. Buckets are summed in two parts: the traits that read nothing but
# their events' count (most of the buckets: sessions, days, categories, orders) without
# the other aggregates, whose states every group carried (0.91x the statement). Traits
# come as numbers (`ProfileBuilder._trait_names`, given by the accumulator read), and the
# parameters name them by number: grouping and comparing an integer rather than a name,
# the statement ran at 0.83-0.86x on a 1,567-person rebuild.
_ROLLUP = f"""
WITH joined AS MATERIALIZED (
    SELECT a.view, s.trait, s.bucket, s.n, s.amount, s.first_ts, s.last_ts, s.value, s.last_key
    FROM _person_rows s JOIN _ag_shared a USING (record_id, purpose, jurisdiction)
    WHERE (s.trait <> $seen OR $read_seen)  -- the groups' own rows, for `SEEN`'s twins
      AND (NOT list_contains($windowed, s.trait) OR left(s.bucket, 10) > a.horizon)
), buckets AS (
    SELECT view, trait, bucket, sum(n)::BIGINT AS n,
           CASE WHEN list_contains($windowed, trait) THEN left(bucket, 10) END AS day
    FROM joined WHERE NOT list_contains($rich, trait)
    GROUP BY view, trait, bucket  -- `day` follows from these
    UNION ALL BY NAME
    SELECT view, trait, bucket, sum(n)::BIGINT AS n,
           CASE WHEN list_contains($windowed, trait) THEN left(bucket, 10) END AS day,
           sum(amount) FILTER (WHERE list_contains($amounts, trait)) AS amount,
           min(first_ts) FILTER (WHERE list_contains($firsts, trait)) AS first_ts,
           max(last_ts) FILTER (WHERE list_contains($lasts, trait)) AS last_ts,
           arg_max(value, (last_ts, last_key)) FILTER (WHERE list_contains($values, trait)) AS value
    FROM joined WHERE list_contains($rich, trait)
    GROUP BY view, trait, bucket
), days AS (
    SELECT view, trait, day,
           sum(CASE WHEN list_contains($day_sums, trait) THEN n ELSE 1 END)::BIGINT AS n
    FROM buckets WHERE day IS NOT NULL GROUP BY ALL
)
SELECT view, trait, sum(n)::BIGINT AS n, count(*)::BIGINT AS buckets,
       {_iso_utc("min(first_ts)")} AS first_ts, {_iso_utc("max(last_ts)")} AS last_ts,
       any_value(value) AS value,  -- a latest trait has one bucket, ''
       to_json(list(bucket) FILTER (WHERE list_contains($keyed, trait))) AS keys,
       to_json(list(n) FILTER (WHERE list_contains($keyed, trait))) AS counts,
       to_json(list(amount::VARCHAR) FILTER (WHERE list_contains($amounts, trait))) AS amounts
FROM buckets WHERE day IS NULL GROUP BY ALL
UNION ALL BY NAME
SELECT view, trait, to_json(list(day)) AS keys, to_json(list(n)) AS counts FROM days GROUP BY ALL
"""

# A view's identify traits (`ProfileBuilder._stated`), one row per (view, trait name) with
# what its merge strategy reads: the latest (time, event key)'s time, key and value always,
# the first value for `first`, and every value in (time, key) order only for the
# strategies that merge them all. Fetching every stored value in order cost 4x the rows
# for the latest-value traits (most), each turned into Python objects and grouped there.
# The latest is one aggregate, the greatest (time, event key, value) struct: a view's
# trait has each (time, event key) once (`trait_facts`' key is (event key, name)), so the
# value never decides; `max(ts)` and two `arg_max`es over a (time, key) struct cost 8% more.
# Its time comes as the profile's text (`_iso_utc`), not a datetime object. Each trait row
# carries its event's purpose and jurisdiction: a join through `facts` for them scanned
# the whole table.
_IDENTIFY = f"""
SELECT person_id, scope, name, {_iso_utc("latest.ts")} AS ts, latest.event_key AS event_key,
       latest.value AS last, first, merged
FROM (
    SELECT a.person_id, a.scope, t.name,
           max({{'ts': t.ts, 'event_key': t.event_key, 'value': t.value}}) AS latest,
           arg_min(t.value, (t.ts, t.event_key)) FILTER (WHERE CASE
               WHEN list_contains($named::VARCHAR[], t.name)
               THEN list_contains($firsts::VARCHAR[], t.name)
               ELSE $default = 'first' END) AS first,
           list(t.value ORDER BY t.ts, t.event_key) FILTER (WHERE CASE
               WHEN list_contains($named::VARCHAR[], t.name)
               THEN list_contains($merged::VARCHAR[], t.name)
               ELSE $default NOT IN ('latest', 'first') END) AS merged
    FROM trait_facts t JOIN _ag_shared a ON a.record_id = t.record_id
                                        AND a.purpose = coalesce(t.purpose, '')
                                        AND a.jurisdiction = coalesce(t.jurisdiction, '')
    WHERE t.person_id IN (SELECT person_id FROM _affected)
    GROUP BY ALL
)
ORDER BY 1, 2, 3
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
_TS = pa.timestamp("us", tz="UTC")
# A trait_facts row's columns taken from its event's fact (`ProfileBuilder.add`).
_TRAIT_EVENT_COLUMNS = ["event_key", "person_id", "record_id", "ts", "purpose", "jurisdiction"]
CENT = Decimal("0.01")
# Day 0 of Arrow's `date32` (days since the Unix epoch).
_EPOCH_DAY = date(1970, 1, 1)
# The view of everything held about a person (GDPR art. 15 access), readable by admins only.
SUBJECT_ACCESS = "subject_access"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


# The event kinds whose contracts type a fact's own fields (`fact_fields`).
_ORDER_KINDS = frozenset({"order_completed", "order_refunded"})
_TICKET_KINDS = frozenset({"ticket_opened", "ticket_closed", "csat_submitted"})
_FIELD_KINDS = _ORDER_KINDS | _TICKET_KINDS
_NO_FIELDS = (None, None, None, None, None)


def fact_fields(kind: str, event: dict[str, Any]) -> tuple[Any, Decimal | None, Any, Any, Any]:
    """The fields of its own a fact of an applied event has: order id, amount (exact, to
    the cent), currency, ticket id and score; None where its kind has none."""
    if kind not in _FIELD_KINDS:
        return _NO_FIELDS
    props = _dict(event.get("properties"))
    # Only kinds whose contract types these fields read them: a page's free-form
    # properties may hold an "order_id" that is a number (found by the stream fuzz test).
    if kind in _ORDER_KINDS:
        amount = props.get("total")
        return (
            props.get("order_id"),
            Decimal(str(amount)).quantize(CENT) if amount is not None else None,
            props.get("currency"),
            None,
            None,
        )
    return (
        None,
        None,
        None,
        props.get("ticket_id"),
        props.get("score") if kind == "csat_submitted" else None,
    )


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


class AllowedGroups(NamedTuple):
    """What a rebuild's persons may show, per view: (person, scope). `views`: the (ingestion
    purpose, jurisdiction) of each view's allowed groups; `records`: the records of each
    person's groups of a purpose and jurisdiction, which a view allows all or none of;
    `shared`: the view whose roll-up it shares (the least scope allowing the same groups);
    `view_of`: the shared views by number; `shown`: each shared view's identifiers by type;
    `identifiers`: each person's identifiers by type, whatever the view; `owners`: the
    person of each of their identity records."""

    views: dict[tuple[str, str], list[tuple[str, str]]]
    records: dict[tuple[str, str, str], list[str]]
    shared: dict[tuple[str, str], str]
    view_of: dict[int, tuple[str, str]]
    shown: dict[tuple[str, str], dict[str, list[str]]]
    identifiers: dict[str, dict[str, list[str]]]
    owners: dict[str, str]

    def groups(self, view: tuple[str, str]) -> list[tuple[str, str, str]]:
        """A view's allowed groups: (record, ingestion purpose, jurisdiction)."""
        person = view[0]
        return [
            (record, purpose, jurisdiction)
            for purpose, jurisdiction in self.views[view]
            for record in self.records[(person, purpose, jurisdiction)]
        ]


# The identifier types in name order, each with its position in `STRONG_FIELDS`.
_TYPE_ORDER = sorted((id_type, position) for position, id_type in enumerate(STRONG_FIELDS))
# The same, each with its column in a row of the identity index (person, record, values).
_ROW_TYPE_ORDER = [(id_type, position + 2) for id_type, position in _TYPE_ORDER]


def _sorted_ids(by_type: dict[str, set[str]]) -> dict[str, list[str]]:
    """Identifier values by type, types and values in order."""
    return {id_type: sorted(by_type[id_type]) for id_type in sorted(by_type)}


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
        # Persons -> their identity records, rows of (person, record, then the strong
        # identifiers' values in `STRONG_FIELDS` order), or None: the identity resolver's
        # in-memory index, set by the pipeline; else `id_records`.
        self.records_of: Callable[[list[str]], list[tuple] | None] = lambda _persons: None
        # Persons -> those merged into each (sorted; only persons with some), or None: the
        # identity resolver's in-memory index, set by the pipeline; else `id_persons`.
        self.merged_into: Callable[[list[str]], dict[str, list[str]] | None] = lambda _p: None
        self.traits = traits or load_traits(known_kinds=set(policy.event_purposes))
        conn.execute(SCHEMA_SQL)
        self._settle_trait_facts()
        self._folded_rows = self._count("trait_state")
        self._delta_rows = self._count("trait_deltas")
        self._unfolded: list[int] = []  # the slices a fold under way has still to fold
        # Traits read through another's rows (`_settle_sources`): never written; their own
        # rows, in a store written before, are deleted.
        self._read_through: dict[str, str] = {}
        self._settle_sources()
        self._unwritten = frozenset(self._read_through)
        self._rolled_columns = rolled_columns(self.traits, self._read_through)
        self._twins = sorted(self._read_through)
        # The accumulator rows' traits, numbered (`_allowed_groups` reads each row's trait as
        # its number, 1 on, 0 for a trait the catalog no longer has): `_ROLLUP` groups and
        # compares integers, not names. `_trait_names[number]` is the name (None for 0).
        names = sorted({SEEN, *(spec.name for spec in self.traits.computed)})
        self._trait_names: list[str | None] = [None, *names]
        number = {name: position for position, name in enumerate(self._trait_names)}
        self._seen_number = number[SEEN]
        traits_read = {k: v for k, v in self._rolled_columns.items() if k != "max_window"}
        # The traits whose buckets sum more than their events (`_ROLLUP`'s second part).
        rich = ("amounts", "firsts", "lasts", "values")
        traits_read["rich"] = sorted({t for k in rich for t in traits_read[k]})
        self._rollup_params: dict[str, Any] = {
            **{k: [number[name] for name in v] for k, v in traits_read.items()},
            "read_seen": SEEN in self._read_through.values(),
            "seen": self._seen_number,
        }
        self._rollup_plan = rollup_plan(self.traits, self._read_through)
        # What silence means, per jurisdiction and purpose: the fallback of every view (a
        # jurisdiction the policy does not name has none: denied).
        self._default_of = {
            (j, p): policy.default_status(j, p)
            for j in policy.jurisdictions
            for p in policy.purposes
        }
        self._scopes = list(self.policy.purposes)
        # Every view's scope in order: the least of views allowing the same groups first.
        self._view_scopes = sorted({SUBJECT_ACCESS, *self._scopes})
        strategies = self.traits.strategies
        self._identify_params = {
            "named": sorted(strategies),
            "firsts": sorted(n for n, s in strategies.items() if s == "first"),
            "merged": sorted(n for n, s in strategies.items() if s not in ("latest", "first")),
            "default": self.traits.default_strategy,
        }

    @property
    def read_through(self) -> dict[str, str]:
        """The traits read through another trait's accumulator rows (never written): each
        mapped to that trait."""
        return dict(self._read_through)

    def _settle_sources(self) -> None:
        """Choose, in each family of traits that add the same rows (`row_families`), the
        traits whose rows are written and those read through them (`_read_through`, kept
        in `trait_sources`).

        A trait whose stored history is its family's source's (as many events counted;
        every trait of an empty store) is read through it, and its own rows, if a store
        written before holds them, are deleted. So is a window twin behind the fullest of
        its family (fewer events counted: it joined the catalog after events were stored),
        which is what a rebuild from every event would give it. Any other trait that joined
        its family later keeps its own, shorter history and is written. A trait read
        through one that left its family (removed from the catalog, or changed) is given
        that one's rows first, and written from then on.
        """
        q = self.conn.execute
        recorded = dict(q("SELECT trait, source FROM trait_sources").fetchall())
        family_of = {name: family for family in self.traits.row_families for name in family}
        specs = {spec.name: spec for spec in self.traits.computed}
        copied = 0
        for trait, source in sorted(recorded.items()):
            if trait in specs and source in family_of.get(trait, ()):
                continue
            if trait in specs:  # its source left the family: its history becomes its own
                ((rows,),) = q(
                    """INSERT INTO trait_deltas BY NAME
                       SELECT * REPLACE (?::VARCHAR AS trait) FROM trait_rows WHERE trait = ?""",
                    [trait, source],
                ).fetchall()
                copied += rows
            q("DELETE FROM trait_sources WHERE trait = ?", [trait])
            del recorded[trait]
        self._delta_rows += copied
        if not family_of:
            return
        counted = {  # events counted, and those counted as additions (a mean's rows)
            trait: (n, added)
            for trait, n, added in q(
                """SELECT trait, sum(n)::BIGINT,
                          coalesce(sum(n) FILTER (WHERE NOT starts_with(bucket, '-|')), 0)::BIGINT
                   FROM trait_rows WHERE trait IN (SELECT unnest(?)) GROUP BY trait""",
                [sorted(family_of)],
            ).fetchall()
        }

        def events(trait: str, as_of: str) -> int:
            n, added = counted.get(trait, (0, 0))
            return added if as_of != SEEN and specs[as_of].op == "mean" else n

        gone: list[str] = []  # traits now read through another, their own rows deleted
        for family in self.traits.row_families:
            written = [name for name in family if name not in recorded]
            source = min(  # `SEEN`, else a sum (a mean lacks its subtractions), the fullest
                written,
                key=lambda n: (n != SEEN, n != SEEN and specs[n].op != "sum", -events(n, n)),
            )
            windowed = source != SEEN and bool(specs[source].window_days)
            for name in written:
                if name != source and (windowed or events(name, name) == events(source, name)):
                    self._read_through[name] = source
                    gone.append(name)
        for name, held in recorded.items():  # through a trait that stays written, or its source
            self._read_through[name] = self._read_through.get(held, held)
        changed = {n: s for n, s in self._read_through.items() if recorded.get(n) != s}
        if changed:
            q(
                """INSERT OR REPLACE INTO trait_sources
                   SELECT unnest(?::VARCHAR[]), unnest(?::VARCHAR[])""",
                [list(changed), list(changed.values())],
            )
        if gone:
            for table in TRAIT_TABLES:
                q(f"DELETE FROM {table} WHERE trait IN (SELECT unnest(?))", [gone])
            self._folded_rows = self._count("trait_state")
            self._delta_rows = self._count("trait_deltas")
            q("CHECKPOINT")  # a store written before, settled once: not a batch's to write

    def _settle_trait_facts(self) -> None:
        """Give a store written before `trait_facts` carried them its rows' ingestion purpose
        and jurisdiction, from their events' facts (once)."""
        q = self.conn.execute
        columns = {name for _, name, *_ in q("PRAGMA table_info('trait_facts')").fetchall()}
        if "jurisdiction" in columns:
            return
        q("ALTER TABLE trait_facts ADD COLUMN IF NOT EXISTS purpose VARCHAR")
        q("ALTER TABLE trait_facts ADD COLUMN jurisdiction VARCHAR")
        q(
            """UPDATE trait_facts SET purpose = f.purpose, jurisdiction = f.jurisdiction
               FROM facts f WHERE f.event_key = trait_facts.event_key"""
        )
        q("CHECKPOINT")  # a store written before, settled once: not a batch's to write

    def _count(self, table: str) -> int:
        ((rows,),) = self.conn.execute(f"SELECT count(*) FROM {table}").fetchall()
        return rows

    def _insert(self, table: str, rows: pa.Table, fresh: bool = False) -> set[str] | None:
        """Insert rows not already there; out: the event keys that were new. With `fresh`
        the rows are known not to be there: inserted without a look-up of each key first
        (`INSERT OR IGNORE`, which with its returned keys cost 2-4x the plain insert, more
        as the table grows), out: None (all new); a key there after all fails the insert."""
        if not rows.num_rows:
            return set()
        _builder_rows = rows  # read by its name (a replacement scan)
        if fresh:
            self.conn.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _builder_rows")
            return None
        return {
            key
            for (key,) in self.conn.execute(
                f"INSERT OR IGNORE INTO {table} BY NAME SELECT * FROM _builder_rows "
                "RETURNING event_key"
            ).fetchall()
        }

    def add(
        self,
        applied: list[tuple[str, str, str, dict[str, Any], datetime, str]],
        fresh: bool = False,
    ) -> set[str]:
        """Record applied events as facts and add them to their computed-trait accumulators.

        In: (event_key, person_id, kind, event, ts, identity record id) per event, keys
        distinct. Out: the persons whose profiles changed. An event already recorded adds
        nothing again; `fresh`: the caller knows none is recorded (an event's fact is
        written with its outcome, and only events without one come), so no key is looked
        up (an event recorded after all fails the batch instead of counting twice).
        """
        if not applied:
            return set()
        # Built as columns, a list per field: a dict per event turned into Arrow by
        # `from_pylist` cost more than the statements that insert them.
        keys, persons, kinds, events, stated, records = map(list, zip(*applied, strict=True))
        # The same instant with datetime.UTC itself: pyarrow converts datetimes of any
        # other tzinfo object (the contract's own UTC included) ~60x slower.
        stamps = [ts.astimezone(UTC) for ts in stated]
        purpose_of = {kind: self.policy.purpose_for(kind) for kind in set(kinds)}
        countries = [event_country(event) for event in events]
        jurisdiction_of = {c: self.policy.jurisdiction_of(c) for c in set(countries)}
        own = [fact_fields(kind, event) for kind, event in zip(kinds, events, strict=True)]
        order_ids, amounts, currencies, tickets, scores = zip(*own, strict=True)
        facts = pa.Table.from_arrays(
            [
                pa.array(keys, pa.string()),
                pa.array(persons, pa.string()),
                pa.array(records, pa.string()),
                pa.array(kinds, pa.string()),
                pa.array(stamps, _TS),
                pa.array(order_ids, pa.string()),
                pa.array(amounts, pa.decimal128(18, 2)),
                pa.array(currencies, pa.string()),
                pa.array(tickets, pa.string()),
                pa.array(scores, pa.int32()),
                pa.array([purpose_of[kind] for kind in kinds], pa.string()),
                pa.array([jurisdiction_of[c] for c in countries], pa.string()),
            ],
            schema=_FACTS,
        )
        new = self._insert("facts", facts, fresh)
        if new is None or len(new) == len(keys):
            self._accumulate(facts, kinds, events, stamps)
        elif new:  # some recorded before (a replay): only the others add to accumulators
            unseen = [i for i, key in enumerate(keys) if key in new]
            self._accumulate(
                facts.take(pa.array(unseen, pa.int32())),
                [kinds[i] for i in unseen],
                [events[i] for i in unseen],
                [stamps[i] for i in unseen],
            )
        of_event: list[int] = []  # each stated trait's event, by position in `applied`
        names: list[str] = []
        values: list[str] = []
        cut = False  # a name cut to 128 characters, which may meet another in its event
        for number, event in enumerate(events):
            for name, value in traits_of(event).items():
                of_event.append(number)
                name = str(name)
                if len(name) > 128:
                    name, cut = name[:128], True
                names.append(name)
                values.append(orjson.dumps(value).decode())
        if of_event:
            by_trait = facts.select(_TRAIT_EVENT_COLUMNS).take(pa.array(of_event, pa.int32()))
            self._insert(
                "trait_facts",
                by_trait.append_column("name", pa.array(names, pa.string())).append_column(
                    "value", pa.array(values, pa.string())
                ),
                fresh and not cut,
            )
        return set(persons)

    def _accumulate(
        self,
        facts: pa.Table,
        kinds: list[str],
        events: list[dict[str, Any]],
        stamps: list[datetime],
    ) -> None:
        """Add events to the accumulator rows they touch: one append per batch.

        In: the events' facts (as inserted) and, in the same order, their kinds, events and
        UTC times. Python lists the batch's (trait, bucket, amount, value) rows as
        columns (`accumulate`); DuckDB sums them per key and appends the sums to
        `trait_deltas` (summing Python tuples cost more).
        """
        rows = accumulate(self.traits, kinds, events, stamps, self._unwritten)
        if not rows.events:
            return
        # Each event's rank by (time, key); a permutation's own sort order is its inverse.
        by_time = pc.sort_indices(
            facts, sort_keys=[("ts", "ascending"), ("event_key", "ascending")]
        )
        latest = pc.sort_indices(by_time).cast(pa.int32())
        trait_events = pa.Table.from_arrays(
            [
                pa.array(range(facts.num_rows), pa.int32()),
                latest,
                facts["person_id"],
                facts["record_id"],
                pc.fill_null(facts["purpose"], ""),
                facts["jurisdiction"],
                facts["ts"],
                facts["event_key"],
            ],
            names=[
                "event",
                "latest",
                "person_id",
                "record_id",
                "purpose",
                "jurisdiction",
                "ts",
                "event_key",
            ],
        )
        by_row = trait_events.take(pa.array(rows.events, pa.int32()))
        _trait_rows = pa.Table.from_arrays(  # read by `_STATE_APPEND`, by its name
            [
                *by_row.columns,
                pa.array(rows.traits, pa.string()),
                pa.array(rows.buckets, pa.string()),
                pa.array(rows.amounts, pa.decimal128(18, 2)),
                pa.array(
                    [None if v is None else orjson.dumps(v).decode() for v in rows.values],
                    pa.string(),
                ),
            ],
            names=[*by_row.column_names, "trait", "bucket", "amount", "value"],
        )
        ((appended,),) = self.conn.execute(_STATE_APPEND).fetchall()
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
            for name in ("_affected", "_person_rows", "_ag_shared"):
                self.conn.unregister(name)

    def _allowed_groups(self, affected: list[str]) -> AllowedGroups:
        """The affected persons' views and what each allows (`AllowedGroups`). Registered
        until `build` returns (Arrow): `_person_rows`, the affected persons' accumulator
        rows; `_ag_shared`, the groups of each view whose roll-up others share, each such
        view numbered (`view`), with its horizon.

        A group is (identity record, ingestion purpose, jurisdiction). It belongs in the view
        for purpose P when the person currently consents to P and to the ingestion purpose:
        their identifiers' latest statement, else the jurisdiction's default. Worked out in
        Python per class of groups (a person's groups of one ingestion purpose and
        jurisdiction): the five temporary tables and three more queries this took in SQL
        cost more, most of it whatever the batch's size.
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
        # stored persons of a 300,000-person store. Only `SEEN` rows keep their person
        # (the classes read it, the roll-up reads none), and the trait comes as its number
        # (`_trait_names`).
        person_rows = (
            self.conn.sql(
                f"""SELECT * REPLACE (
                   CASE WHEN trait = '{SEEN}' THEN person_id END AS person_id,
                   coalesce(list_position($names, trait), 0)::USMALLINT AS trait,
                   CASE WHEN list_contains($values, trait) THEN value END AS value,
                   CASE WHEN list_contains($values, trait) THEN last_key END AS last_key)
               FROM trait_rows
               WHERE person_id IN (SELECT person_id FROM _affected)
                 AND NOT list_contains($twins, trait)""",
                params={
                    "names": self._trait_names[1:],
                    "twins": self._twins,
                    "values": self._rolled_columns["values"],
                },
            )
            .to_arrow_reader()
            .read_all()
        )
        self.conn.register("_person_rows", person_rows)
        held = self.records_of(affected)
        if held is None:
            # `id_records` is a view that works out every record's current person: read once.
            held = q(
                f"""SELECT person_id, record_id, {", ".join(STRONG_FIELDS)} FROM id_records
                WHERE person_id IN (SELECT person_id FROM _affected)"""
            ).fetchall()
        # Each record's person (as the store has it now) and identifiers, and each person's
        # identifiers by type: every identifier of its records, which index the profile.
        # Each record's row is kept whole (its values from the third column): unpacking
        # the values of each row into a list of their own cost four times the loop.
        owner: dict[str, str] = {}
        row_of: dict[str, tuple] = {}
        records_of: dict[str, list[str]] = {}
        for row in held:
            person = row[0]
            record = row[1]
            owner[record] = person
            row_of[record] = row
            listed = records_of.get(person)
            if listed is None:
                records_of[person] = [record]
            else:
                listed.append(record)
        identifiers: dict[str, dict[str, list[str]]] = {}
        # The same as rows (person, type, value), a column each, for the consent query.
        id_persons: list[str] = []
        id_types: list[str] = []
        id_values: list[str] = []
        for person, records in records_of.items():
            # A column of values per type, a set each: no Python loop per value.
            columns = list(zip(*[row_of[record] for record in records], strict=True))
            ids = {}
            for id_type, position in _ROW_TYPE_ORDER:
                found = set(columns[position])
                found.discard(None)
                if found:
                    ids[id_type] = values = sorted(found)
                    id_persons += [person] * len(values)
                    id_types += [id_type] * len(values)
                    id_values += values
            identifiers[person] = ids
        whole = {person: frozenset(records) for person, records in records_of.items()}
        # A person's consent per purpose: their identifiers' latest statement; of equally
        # recent ones, a refusal (as the gate decides an event).
        _affected_ids = pa.table(  # read by the query below, by its name
            [pa.array(column, pa.string()) for column in (id_persons, id_types, id_values)],
            names=["person_id", "id_type", "id_value"],
        )
        stated: dict[str, dict[str, str]] = {}
        for person, purpose, status in q(
            """SELECT i.person_id, s.purpose,
                      arg_max(s.status, (s.ts, s.status <> 'granted'))
               FROM _affected_ids i JOIN consent_state s USING (id_type, id_value)
               GROUP BY ALL"""
        ).fetchall():
            stated.setdefault(person, {})[purpose] = status
        defaults = self._default_of
        scopes = self._scopes

        def granted(own: dict[str, str], purpose: str, jurisdiction: str) -> bool:
            status = own.get(purpose)
            if status is None:
                status = defaults.get((jurisdiction, purpose))
            return status == "granted"

        # The groups by person, ingestion purpose and jurisdiction: their records, and the
        # day of their last event less the longest window. A view allows or refuses all of
        # one person's groups of a purpose and jurisdiction, so the views are worked out
        # per such class of groups, not per group.
        # Grouped in Arrow over the rows already read (each group's `SEEN` rows: one per
        # group folded, more while deltas are not): a DuckDB query over the registered
        # table, two GROUP BYs and a list per class turned into Python, cost 1.6x as much.
        seen = person_rows.filter(
            pc.and_(
                pc.equal(person_rows["trait"], pa.scalar(self._seen_number, pa.uint16())),
                pc.equal(person_rows["bucket"], ""),
            )
        )
        grouped = seen.group_by(["person_id", "purpose", "jurisdiction"], use_threads=False)
        found = grouped.aggregate([("record_id", "distinct"), ("last_ts", "max")])
        window = self.traits.max_window
        # The UTC day, whatever zone the connection gives its times: Arrow casts a zoned
        # time to the day of its own zone.
        last_days = found["last_ts_max"].cast(_TS).cast(pa.date32()).cast(pa.int32())
        horizons = [
            None if day is None else (_EPOCH_DAY + timedelta(days=day - window)).isoformat()
            for day in last_days.to_pylist()
        ]
        classes = zip(
            found["person_id"].to_pylist(),
            found["purpose"].to_pylist(),
            found["jurisdiction"].to_pylist(),
            found["record_id_distinct"].to_pylist(),
            horizons,
            strict=True,
        )
        # Each person's classes, in the order found: (purpose, jurisdiction), records, horizon.
        by_person: dict[str, list[tuple[tuple[str, str], list[str], str | None]]] = {}
        records_in: dict[tuple[str, str, str], list[str]] = {}
        for person, purpose, jurisdiction, records, horizon in classes:
            records_in[(person, purpose, jurisdiction)] = records
            by_person.setdefault(person, []).append(((purpose, jurisdiction), records, horizon))
        views: dict[tuple[str, str], list[tuple[str, str]]] = {}
        shared: dict[tuple[str, str], str] = {}
        view_of: dict[int, tuple[str, str]] = {}
        # `_ag_shared`'s columns, a row per group of each shared view.
        scope_col: list[str] = []
        person_col: list[str] = []
        record_col: list[str] = []
        purpose_col: list[str] = []
        jurisdiction_col: list[str] = []
        number_col: list[int] = []
        horizon_col: list[str] = []
        by_records: dict[frozenset[str], dict[str, dict[str, list[str]]]] = {}

        def identifiers_of(records: frozenset[str]) -> dict[str, dict[str, list[str]]]:
            """The identifiers of `records` by holder (each record's person now), types and
            values in order: once per set of records (a person's views mostly show one)."""
            known = by_records.get(records)
            if known is None:
                found: dict[str, dict[str, set[str]]] = {}
                for record in records:
                    holder = owner.get(record)
                    if holder is not None:
                        by_type = found.setdefault(holder, {})
                        values = row_of[record][2:]
                        for id_type, value in zip(STRONG_FIELDS, values, strict=True):
                            if value is not None:
                                by_type.setdefault(id_type, set()).add(value)
                known = {holder: _sorted_ids(by_type) for holder, by_type in found.items()}
                by_records[records] = known
            return known

        def shown_by_holder(person: str, records: frozenset[str]) -> dict[str, dict]:
            """`identifiers_of(records)`, of a view of `person`: the person's own identifiers
            when the view holds every one of its records (and so only those)."""
            if whole.get(person) == records:
                return {person: identifiers[person]}
            return identifiers_of(records)

        shown: dict[tuple[str, str], dict[str, list[str]]] = {}
        view_scopes = self._view_scopes
        number = 0
        # Worked out a person at a time, over the positions of its classes. A view allows
        # or refuses all of one class. Views of a person that allow the same classes add
        # up the same rows (consent mostly agrees across purposes): each set is rolled up
        # once, for its least scope (the scopes go in order); the shared views are
        # numbered in (person, scope) order.
        for person in sorted(by_person):
            mine = by_person[person]
            own = stated.get(person, {})
            # What is held, consent aside: a subject access request's view.
            members: dict[str, list[int]] = {SUBJECT_ACCESS: list(range(len(mine)))}
            granted_in: dict[str, list[str]] = {}  # the scopes granted, per jurisdiction
            for i, ((purpose, jurisdiction), _, _) in enumerate(mine):
                if purpose == "" or granted(own, purpose, jurisdiction):
                    into = granted_in.get(jurisdiction)
                    if into is None:
                        into = granted_in[jurisdiction] = [
                            s for s in scopes if granted(own, s, jurisdiction)
                        ]
                    for scope in into:
                        members.setdefault(scope, []).append(i)
            least: dict[tuple[int, ...], str] = {}
            for scope in view_scopes:
                allowed = members.get(scope)
                if not allowed:
                    continue
                views[(person, scope)] = [mine[i][0] for i in allowed]
                key = tuple(allowed)
                of = least.get(key)
                if of is not None:
                    shared[(person, scope)] = of
                    continue
                least[key] = shared[(person, scope)] = scope
                number += 1
                view_of[number] = (person, scope)
                # Windows keep the days after the view's last event less the longest window.
                horizon = ""
                total = 0
                for i in allowed:
                    (purpose, jurisdiction), records, last = mine[i]
                    n = len(records)
                    total += n
                    record_col += records
                    purpose_col += [purpose] * n
                    jurisdiction_col += [jurisdiction] * n
                    if last is not None and last > horizon:
                        horizon = last
                scope_col += [scope] * total
                person_col += [person] * total
                number_col += [number] * total
                horizon_col += [horizon] * total
                records = frozenset(chain.from_iterable(mine[i][1] for i in allowed))
                # A view shows the identifiers of the records that contributed to it.
                for holder, ids in shown_by_holder(person, records).items():
                    known = shown.get((holder, scope))
                    if known is not None:  # records of one holder in two persons' views
                        ids = {
                            t: sorted({*known.get(t, ()), *ids.get(t, ())})
                            for t in sorted({*known, *ids})
                        }
                    shown[(holder, scope)] = ids
        self.conn.register(
            "_ag_shared",
            pa.table(
                [
                    pa.array(scope_col, pa.string()),
                    pa.array(person_col, pa.string()),
                    pa.array(record_col, pa.string()),
                    pa.array(purpose_col, pa.string()),
                    pa.array(jurisdiction_col, pa.string()),
                    pa.array(number_col, pa.int32()),
                    pa.array(horizon_col, pa.string()),
                ],
                names=[
                    "scope",
                    "person_id",
                    "record_id",
                    "purpose",
                    "jurisdiction",
                    "view",
                    "horizon",
                ],
            ),
        )
        indexed = {person: dict(ids) for person, ids in identifiers.items()}
        return AllowedGroups(views, records_in, shared, view_of, shown, indexed, owner)

    def _stated(
        self, rows: list[tuple[str, str, str, str, str, str, str | None, list[str] | None]]
    ) -> dict[tuple[str, str], dict[str, dict[str, Any]]]:
        """Each view's identify traits by name, from `_IDENTIFY`'s rows: (person, scope, name,
        ISO time with its UTC offset and event key of the latest, its JSON value, the first
        JSON value where the strategy is `first`, every JSON value in (ts, event key) order
        where it merges them all), in (person, scope, name) order. Values are parsed only
        where the strategy reads them; one pass, the rows not grouped per view first."""
        stated: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        strategies = self.traits.strategies
        default = self.traits.default_strategy
        loads = orjson.loads
        view: tuple[str, str] | None = None
        traits: dict[str, dict[str, Any]] = {}
        for person, scope, name, ts, event_key, last, first, merged in rows:
            if view != (person, scope):
                view = (person, scope)
                traits = stated.setdefault(view, {})
            strategy = strategies.get(name, default)
            if strategy == "latest":
                value = loads(last)
            elif strategy == "first":
                value = loads(first)  # type: ignore[arg-type]
            else:  # its strategy reads the values alone, in order
                value = merge_identify_trait(
                    strategy, [(ts, event_key, loads(v)) for v in merged or ()], ordered=True
                )
            traits[name] = {"value": value, "ts": ts, "event_key": event_key}
        return stated

    def _merged_from(self, affected: list[str], owners: dict[str, str]) -> dict[str, list[str]]:
        """Each affected person's merged-in persons, sorted: the persons founded by a record
        now in this profile (`owners`: record -> person), other than itself. From the
        identity index when it has the founders: `id_persons` read whole grows with the
        store."""
        merged = self.merged_into(affected)
        if merged is not None:
            return merged
        _affected_records = pa.table(  # read by the query below, by its name
            {
                "record_id": pa.array(list(owners), pa.string()),
                "person_id": pa.array(list(owners.values()), pa.string()),
            }
        )
        return dict(
            self.conn.execute(
                """SELECT r.person_id, list(DISTINCT p.person_id ORDER BY p.person_id)
                   FROM id_persons p JOIN _affected_records r ON r.record_id = p.founder
                   WHERE p.person_id <> r.person_id GROUP BY r.person_id"""
            ).fetchall()
        )

    def _build(self, affected: list[str]) -> dict[str, dict[str, Any]]:
        q = self.conn.execute
        views, _, shared, view_of, shown, indexed, owners = self._allowed_groups(affected)
        # The persons with a profile are those with facts: every fact adds a `SEEN` row to
        # its group (and erasures, merges and splits move or delete facts and accumulator
        # rows alike), so each has its subject access view, from the rows already read.
        # A `DISTINCT` over `facts` for them cost a pass over the whole table.
        profiles: dict[str, dict[str, Any]] = {
            person: {
                "person_id": person,
                "identifiers": {},
                "views": {},
                "merged_from": [],
            }
            for person in sorted({person for person, scope in views if scope == SUBJECT_ACCESS})
        }
        totals: dict[tuple[str, str], dict[str, Totals]] = {}
        loads = orjson.loads
        trait_names = self._trait_names
        for number, trait, n, buckets, first_ts, last_ts, value, keys, counts, amounts in q(
            _ROLLUP, self._rollup_params
        ).fetchall():
            totals.setdefault(view_of[number], {})[trait_names[trait]] = Totals(
                n,
                buckets,
                first_ts,
                last_ts,
                value,
                None if keys is None else loads(keys),
                None if counts is None else loads(counts),
                None
                if amounts is None
                else [a if a is None else Decimal(a) for a in loads(amounts)],
            )
        stated = self._stated(q(_IDENTIFY, self._identify_params).fetchall())
        for person, ids in indexed.items():
            if person in profiles:
                profiles[person]["identifiers"] = ids
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
                    stated.get((person, of), {}),
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
        for person, merged in self._merged_from(affected, owners).items():
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
