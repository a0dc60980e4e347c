"""Incremental identity resolution: records in, stable person ids, merges and splits out.

Each micro-batch of identity records is
1. deduplicated against the store (records are content-addressed),
2. blocked against the store and against itself: deterministic candidates share a
   strong identifier (user_id, customer_id, email, phone, anonymous_id, device ids);
   probabilistic candidates satisfy one of the model's blocking rules,
3. scored: Splink's comparison-level SQL (a view, parsed once) in this DuckDB, then
   Splink's match-weight arithmetic over the levels and the index's term frequencies, and
4. clustered: deterministic links first (strongest identifier first), then probabilistic
   links above the threshold, highest match weight first. A link that would give a
   person more identifiers of a type than the limit allows (two user_ids; a tablet's
   anonymous or device id shared by a household), or that an operator rejected, is not made; the
   conflict is logged.

A person's id is the id its first record created, and survives merges as long as that
record's person is the older one. Re-clustering a component (a link rejected, a record
erased, a threshold raised) gives every piece the id of the oldest person that founded a
record in it, so a split restores the ids the persons had before they merged.

A batch reads only the in-memory CandidateIndex (candidates, fields, each record's
person, each person's records and age); the store is written, never scanned, on the
batch path (but for folding moved records into the base table, once per FOLD_MOVES moves).
A rolled-back batch drops the index (`forget`) and the next one rebuilds it.
"""

from __future__ import annotations

import atexit
import functools
import gc
import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import duckdb
import orjson
import pyarrow as pa

from identity.index import CandidateIndex
from identity.model import ScoringModel
from identity.records import RECORD_FIELDS, STRONG_FIELDS, record_id_of

DEFAULT_LIMITS = {
    "user_id": 1,
    "customer_id": 1,
    "email": 5,
    "phone": 5,
    "anonymous_id": 50,
    # A person has a few phones and tablets; a device id held by more is a shared device.
    "device_id": 5,
    "advertising_id": 5,
}
STRENGTH = {name: rank for rank, name in enumerate(STRONG_FIELDS)}
# The rule of a link through a shared identifier of each type, and its rank by strength.
_SHARED = {name: f"shared:{name}" for name in STRONG_FIELDS}
_SHARED_RANK = {_SHARED[name]: rank for name, rank in STRENGTH.items()}

_FIELD_COLUMNS = ", ".join(f"{f} VARCHAR" for f in RECORD_FIELDS)
# A record's current person is `id_records.person_id`, a view: the person it was stored
# with (`id_records_base`) unless a later merge or split moved it (`id_record_moves`, the
# latest move wins). Moving records is an append, never an UPDATE: an UPDATE on the big
# append-only table makes its own scan and every later commit slower as the store grows.
# Once the moves pass FOLD_MOVES rows they are folded into a fresh copy of the base table
# (one rewrite per FOLD_MOVES moves) and the moves table starts empty again.
# id_records_base, id_persons and id_edges carry no key index: every batch appends to them,
# and keeping an index on them cost more than the rest of the write (checking the key on
# insert and merging the index on commit; its memory grows with the store). Each row is
# written once by construction: a record only while it is new to the CandidateIndex, a
# person only while the index does not know it, an edge only with a new record at one end.
# Stores created with keys keep them; the writes are plain inserts either way.
FOLD_MOVES = 50_000
_BASE_COLUMNS = f"""record_id VARCHAR NOT NULL, person_id VARCHAR NOT NULL, first_ts TIMESTAMPTZ,
    first_event VARCHAR, {_FIELD_COLUMNS}"""
_MOVES_COLUMNS = "record_id VARCHAR, person_id VARCHAR, seq BIGINT"
RECORDS_VIEW_SQL = """
CREATE OR REPLACE VIEW id_records AS
SELECT b.* REPLACE (coalesce(m.person_id, b.person_id) AS person_id)
FROM id_records_base b LEFT JOIN (
    SELECT record_id, arg_max(person_id, seq) AS person_id FROM id_record_moves GROUP BY record_id
) m USING (record_id)
"""
SCHEMA_SQL = f"""
CREATE TABLE IF NOT EXISTS id_records_base ({_BASE_COLUMNS});
CREATE TABLE IF NOT EXISTS id_record_moves ({_MOVES_COLUMNS});
CREATE TABLE IF NOT EXISTS id_persons (
    person_id VARCHAR NOT NULL, first_ts TIMESTAMPTZ, first_event VARCHAR, founder VARCHAR
);
CREATE TABLE IF NOT EXISTS id_edges (
    record_l VARCHAR, record_r VARCHAR, rule VARCHAR, match_weight DOUBLE,
    match_probability DOUBLE, evidence JSON, status VARCHAR, ts TIMESTAMPTZ
);
ALTER TABLE id_records_base ADD COLUMN IF NOT EXISTS device_id VARCHAR;
ALTER TABLE id_records_base ADD COLUMN IF NOT EXISTS advertising_id VARCHAR;
CREATE TABLE IF NOT EXISTS id_settings (name VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS id_cannot_link (
    record_l VARCHAR, record_r VARCHAR, reason VARCHAR, ts TIMESTAMPTZ,
    PRIMARY KEY (record_l, record_r)
);
"""
_RECORD_SCHEMA = pa.schema([("record_id", pa.string()), *((f, pa.string()) for f in RECORD_FIELDS)])
_AT = {name: at for at, name in enumerate(RECORD_FIELDS)}


def _create_schema(conn: duckdb.DuckDBPyConnection) -> None:
    """Create the identity store's tables and the `id_records` view, moving a store that
    kept `id_records` as a table (with each record's current person in it) to the base."""
    kinds = dict(
        conn.execute(
            """SELECT table_name, table_type FROM information_schema.tables
               WHERE table_catalog = current_database() AND table_schema = current_schema()
                 AND table_name IN ('id_records', 'id_records_base')"""
        ).fetchall()
    )
    if kinds.get("id_records") == "BASE TABLE" and "id_records_base" not in kinds:
        conn.execute("ALTER TABLE id_records RENAME TO id_records_base")
    conn.execute(SCHEMA_SQL)
    if kinds.get("id_records") != "VIEW":
        conn.execute(RECORDS_VIEW_SQL)


def person_id_for(event_key: str) -> str:
    """The stable id of a person first seen in the event `event_key`."""
    return "p_" + hashlib.blake2b(event_key.encode(), digest_size=8).hexdigest()


@dataclass
class Resolution:
    """What a batch (or a re-clustering) did to the identity store."""

    person_of: list[str]  # the person of each input item, after the whole batch
    merged: dict[str, str]  # merged-away person -> surviving person
    moved: dict[str, str]  # record -> its new person, for records a split moved
    touched: set[str]  # persons whose records changed
    log: list[dict[str, Any]]  # person_created / record_linked / merge / split / conflict


@dataclass
class _Cluster:
    records: set[str]
    ids: dict[str, set[str]]
    persons: set[str] = field(default_factory=set)  # existing persons inside


class _Edge(NamedTuple):
    # A named tuple rather than a frozen dataclass: a batch makes one per identifier a new
    # record shares, and a frozen dataclass's constructor sets each field through
    # object.__setattr__ (a few times slower).
    record_l: str
    record_r: str
    rule: str
    match_weight: float | None = None
    match_probability: float | None = None
    evidence: dict[str, Any] | None = None


class IdentityResolver:
    """The identity store in DuckDB and the incremental resolver over it.

    In: the caller's connection (writes happen inside its transaction), an optional
    ScoringModel (deterministic linking only without one), per-type identifier limits.
    """

    def __init__(
        self,
        conn: duckdb.DuckDBPyConnection,
        model: ScoringModel | None = None,
        limits: dict[str, int] | None = None,
    ) -> None:
        self.conn = conn
        self.model = model
        self.limits = dict(DEFAULT_LIMITS if limits is None else limits)
        _create_schema(conn)
        self._index: CandidateIndex | None = None
        self._threshold_checked = False
        self._moves: int | None = None  # rows in id_record_moves (None: not counted yet)
        self._last_seq: int | None = None  # its highest seq (None: not read yet)
        # This batch's scored pairs above the threshold, with their per-comparison evidence.
        self._scored: dict[tuple[str, str], dict[str, Any]] = {}
        self._score_view = False
        # Probabilistic candidates from equality rules on one strong identifier are the
        # deterministic links already: only the other rules need scoring.
        self._rules = [
            rule
            for rule in (model.equality_rules if model else [])
            if not (len(rule) == 1 and rule[0] in STRONG_FIELDS)
        ]

    @property
    def index(self) -> CandidateIndex:
        """The in-memory candidate index, built from the store on first use."""
        if self._index is None:
            tf_columns = self.model.tf_columns if self.model else []
            self._index = CandidateIndex.load(self.conn, self._rules, tf_columns)
            # The loaded index lives until `forget`: keep full collections from scanning it
            # after every batch. It holds no reference cycles, so reference counting still
            # frees it once dropped; collecting first freezes no garbage with it.
            gc.collect()
            gc.freeze()
            unfreeze_at_exit()
        return self._index

    def forget(self) -> None:
        """Drop in-memory state (after a rolled-back batch): the next batch rebuilds it."""
        self._index = None
        self._threshold_checked = False
        self._moves = None
        self._last_seq = None
        self._score_view = False  # a rolled-back batch may have created it

    def apply_threshold(self, key: str, ts: datetime) -> Resolution | None:
        """Once per start: if the model's threshold was raised since the store last ran,
        re-cluster every person held together by a link below it (an unmerge). Lowering
        it affects new records only: pairs below the old threshold were never kept."""
        if self.model is None or self._threshold_checked:
            return None
        self._threshold_checked = True
        current = self.model.threshold
        rows = self.conn.execute(
            "SELECT value FROM id_settings WHERE name = 'threshold'"
        ).fetchall()
        stored = float(rows[0][0]) if rows else None
        if stored == current:
            return None
        self.conn.execute(
            "INSERT OR REPLACE INTO id_settings VALUES ('threshold', ?)", [repr(current)]
        )
        if stored is None or current < stored:
            return None
        persons = {
            p
            for (p,) in self.conn.execute(
                """SELECT DISTINCT r.person_id FROM id_edges e
                   JOIN id_records r ON r.record_id IN (e.record_l, e.record_r)
                   WHERE e.rule = 'splink' AND e.status = 'active' AND e.match_probability < ?""",
                [current],
            ).fetchall()
        }
        log = LinkLog()
        key = f"{key}:{current!r}"
        _log(log, "threshold_raised", None, None, f"{stored!r} -> {current!r}", key, ts, None)
        return self.recluster(persons, key, ts, log)

    # -- the batch path ----------------------------------------------------------------------

    def resolve(
        self,
        items: list[tuple[str, datetime, dict[str, str | None]]],
        record_ids: list[str] | None = None,
    ) -> Resolution:
        """Resolve a batch of records, in order, inside the caller's transaction.

        In: (event_key, timestamp, normalised record fields) per event, and optionally each
        item's record id (`record_id_of` its fields) when the caller has it already. Out: a
        Resolution whose person_of[i] is the person of items[i].

        Everything a batch reads comes from the in-memory index (candidates, fields,
        persons, their records): the store is only written, so a batch costs the same at
        a million stored records as at a thousand.
        """
        log: list[dict[str, Any]] = LinkLog()
        index = self.index
        record_of = [record_id_of(i[2]) for i in items] if record_ids is None else record_ids
        known = index.person_of
        new: dict[str, tuple[str, datetime, dict[str, str | None]]] = {}
        for record_id, item in zip(record_of, items, strict=True):
            if record_id not in known and record_id not in new:
                new[record_id] = item
        if not new:
            return Resolution([index.person_of[r] for r in record_of], {}, {}, set(), log)
        fields_of = {r: v[2] for r, v in new.items()}
        edges = [_Edge(r, a, _SHARED[name]) for r, a, name in index.deterministic_edges(fields_of)]
        pairs = index.candidate_pairs(fields_of)
        index.add(fields_of.items())
        if self.model is not None:
            edges += self._probabilistic_edges(pairs, new)
        involved = {e.record_l for e in edges} | {e.record_r for e in edges}
        clusters, member_of = self._load_clusters(
            {index.person_of[r] for r in involved if r in index.person_of}
        )
        for record_id, (_, _, fields) in new.items():
            cluster = _Cluster({record_id}, _ids_of(fields))
            clusters[record_id] = cluster
            member_of[record_id] = record_id
        cannot = {pair for pair in index.cannot if any(record in member_of for record in pair)}
        first_event = {r: v[0] for r, v in new.items()}
        when = {v[0]: v[1] for v in new.values()}
        # edge, its kind (record_linked / merge), the persons it brought together
        unions: list[tuple[_Edge, str, frozenset[str]]] = []
        for edge in _ordered(edges):
            a, b = member_of.get(edge.record_l), member_of.get(edge.record_r)
            if a is None or b is None or a == b:
                continue
            left, right = clusters[a], clusters[b]
            problem = self._conflict(left, right, cannot)
            key = first_event.get(edge.record_l) or first_event.get(edge.record_r) or ""
            if problem:
                _log(
                    log,
                    "conflict",
                    _person(left),
                    _person(right),
                    problem,
                    key,
                    when.get(key),
                    edge,
                )
                continue
            kind = "merge" if left.persons and right.persons else "record_linked"
            joined = frozenset(left.persons | right.persons)
            keep, gone = (a, b) if len(left.records) >= len(right.records) else (b, a)
            clusters[keep].records |= clusters[gone].records
            clusters[keep].persons |= clusters[gone].persons
            for id_type, values in clusters[gone].ids.items():
                clusters[keep].ids.setdefault(id_type, set()).update(values)
            for record in clusters[gone].records:
                member_of[record] = keep
            del clusters[gone]
            unions.append((edge, kind, joined))
        return self._commit(new, record_of, clusters, member_of, edges, unions, log)

    def _persons_of(self, record_ids: list[str]) -> dict[str, str]:
        if not record_ids:
            return {}
        self.conn.register("_wanted", pa.table({"record_id": record_ids}))
        try:
            rows = self.conn.execute(
                "SELECT record_id, person_id FROM id_records JOIN _wanted USING (record_id)"
            ).fetchall()
        finally:
            self.conn.unregister("_wanted")
        return dict(rows)

    def _sql_blocked_pairs(
        self, new: dict[str, tuple[str, datetime, dict[str, str | None]]]
    ) -> set[tuple[str, str]]:
        """Pairs from blocking rules that are not plain equalities (the index cannot serve
        them): the batch joined against the store and against itself."""
        model = self.model
        assert model is not None
        rows = {"record_id": list(new)}
        for name in RECORD_FIELDS:
            rows[name] = [fields.get(name) for _, _, fields in new.values()]
        self.conn.register("_new", pa.table(rows, schema=_RECORD_SCHEMA))
        try:
            blocked = " UNION ".join(
                f"""SELECT least(l.record_id, r.record_id), greatest(l.record_id, r.record_id)
                    FROM _new l JOIN {side} r ON ({condition}) AND l.record_id <> r.record_id"""
                for condition in model.other_conditions
                for side in ("id_records_base", "_new")
            )
            return set(self.conn.execute(blocked).fetchall())
        finally:
            self.conn.unregister("_new")

    def _probabilistic_edges(
        self,
        pairs: set[tuple[str, str]],
        new: dict[str, tuple[str, datetime, dict[str, str | None]]],
    ) -> list[_Edge]:
        model = self.model
        assert model is not None
        self._scored = {}
        if model.other_conditions:
            pairs = pairs | self._sql_blocked_pairs(new)
        # A pair that shares a strong identifier is a deterministic link already (held to
        # the same limits and operator rejections): scoring it would change nothing.
        fields = self.index.fields
        strong = [_AT[c] for c in STRONG_FIELDS if c in model.columns]
        open_pairs = sorted(
            (a, b)
            for a, b in pairs
            if not any(fields[a][i] is not None and fields[a][i] == fields[b][i] for i in strong)
        )
        if not open_pairs:
            return []
        scored = self._score(open_pairs)
        if not scored:
            return []
        # Links above the threshold are kept (re-clustering reads them; `_write` stores
        # them); their per-comparison evidence stays here until the links that joined
        # persons are known.
        edges = []
        for row in scored:
            edge = _Edge(
                row["record_id_l"],
                row["record_id_r"],
                "splink",
                row["match_weight"],
                row["match_probability"],
            )
            self._scored[(edge.record_l, edge.record_r)] = row
            edges.append(edge)
        return edges

    def _score(self, pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """Splink's match weights for `pairs`, from the records' fields in the index: the
        pairs at or above the threshold, with each comparison's level and weight.

        DuckDB compares the fields (Splink's comparison-level SQL, bound once per batch);
        the weights are Splink's arithmetic over the levels and the index's term
        frequencies, done here for the pairs DuckDB returns."""
        model = self.model
        assert model is not None
        index = self.index
        fields = index.fields
        ids = sorted({r for pair in pairs for r in pair})
        columns: dict[str, pa.Array] = {"record_id": pa.array(ids, pa.string())}
        for name in model.model_columns:
            at = _AT[name]
            columns[name] = pa.array([fields[r][at] for r in ids], pa.string())
        self.conn.register("_pair_recs", pa.table(columns))
        self.conn.register(
            "_open_pairs",
            pa.table(
                {
                    "record_id_l": pa.array([p[0] for p in pairs], pa.string()),
                    "record_id_r": pa.array([p[1] for p in pairs], pa.string()),
                }
            ),
        )
        try:
            if not self._score_view:
                self.conn.execute(
                    "CREATE OR REPLACE TEMP VIEW _identity_gammas AS "
                    + model.gamma_sql("_open_pairs", "_pair_recs")
                )
                self._score_view = True
            cursor = self.conn.execute("SELECT * FROM _identity_gammas")
            names = [d[0] for d in cursor.description]
            assert names[2:] == [f"gamma_{c}" for c in model.comparisons]
            rows = cursor.fetchall()
        finally:
            self.conn.unregister("_pair_recs")
            self.conn.unregister("_open_pairs")
        comparisons = model.comparisons
        tf_at = [(name, _AT[name]) for name in model.tf_columns]
        frequency = index.term_frequency
        tf_cache: dict[str, dict[str, float | None]] = {}

        def tf_of(record: str) -> dict[str, float | None]:
            tf = tf_cache.get(record)
            if tf is None:
                values = fields[record]
                tf = tf_cache[record] = {n: frequency(n, values[at]) for n, at in tf_at}
            return tf

        scored = []
        threshold = model.threshold
        for row in rows:
            gammas = dict(zip(comparisons, row[2:], strict=True))
            weight, probability, parts = model.weigh(gammas, tf_of(row[0]), tf_of(row[1]))
            if probability < threshold:
                continue
            out = {
                "record_id_l": row[0],
                "record_id_r": row[1],
                "match_weight": weight,
                "match_probability": probability,
            }
            out.update((f"gamma_{c}", g) for c, g in gammas.items())
            out.update((f"w_{c}", w) for c, w in parts.items())
            scored.append(out)
        return scored

    # -- clusters ----------------------------------------------------------------------------

    def _load_clusters(self, persons: set[str]) -> tuple[dict[str, _Cluster], dict[str, str]]:
        index = self.index
        clusters: dict[str, _Cluster] = {}
        member_of: dict[str, str] = {}
        for person in persons:
            records = index.members[person]
            clusters[person] = _Cluster(set(records), index.identifiers(records), {person})
            member_of.update(dict.fromkeys(records, person))
        return clusters, member_of

    def _cannot_links(self, records: set[str]) -> set[frozenset[str]]:
        rows = self.conn.execute("SELECT record_l, record_r FROM id_cannot_link").fetchall()
        return {frozenset(r) for r in rows if r[0] in records or r[1] in records}

    def _conflict(self, a: _Cluster, b: _Cluster, cannot: set[frozenset[str]]) -> str | None:
        limits, held_by = self.limits, a.ids
        for id_type, values in b.ids.items():
            limit = limits.get(id_type)
            if limit is None:
                continue
            held = held_by.get(id_type)
            # The union is built only when the two could exceed the limit together.
            if held is None:
                if len(values) > limit:
                    return f"limit:{id_type}"
            elif len(held) + len(values) > limit and len(held | values) > limit:
                return f"limit:{id_type}"
        if cannot:
            small, large = sorted((a.records, b.records), key=len)
            for pair in cannot:
                x, y = tuple(pair)
                if (x in small and y in large) or (y in small and x in large):
                    return "rejected_link"
        return None

    def _ages(self, persons: set[str]) -> dict[str, tuple[datetime, str]]:
        if not persons:
            return {}
        self.conn.register("_aged", pa.table({"person_id": sorted(persons)}))
        try:
            rows = self.conn.execute(
                "SELECT person_id, first_ts FROM id_persons JOIN _aged USING (person_id)"
            ).fetchall()
        finally:
            self.conn.unregister("_aged")
        return {p: (ts, p) for p, ts in rows}

    def _commit(self, new, record_of, clusters, member_of, edges, unions, log) -> Resolution:
        index = self.index
        person_of_root: dict[str, str] = {}
        merged: dict[str, str] = {}
        created: list[tuple[str, datetime, str, str]] = []
        for root, cluster in clusters.items():
            if cluster.persons:
                survivor = min(cluster.persons, key=index.born.__getitem__)
                for loser in cluster.persons - {survivor}:
                    merged[loser] = survivor
            else:
                founder = min(cluster.records, key=lambda r: (new[r][1], new[r][0], r))
                key, ts, _ = new[founder]
                survivor = person_id_for(key)
                created.append((survivor, ts, key, founder))
                _log(log, "person_created", survivor, None, "new", key, ts, None, founder)
            person_of_root[root] = survivor
        person = {r: person_of_root[member_of[r]] for r in new}
        # Every record of a merged-away person moves to the survivor.
        moved = {r: survivor for loser, survivor in merged.items() for r in index.members[loser]}
        self._write(new, person, created, moved, edges, unions)
        for survivor, ts, _, founder in created:
            if survivor not in index.born:  # the row `_write` wrote
                index.found(founder, survivor)
            index.born[survivor] = (ts, survivor)
        for record, target in (*((r, person[r]) for r in new), *moved.items()):
            index.assign(record, target)
        unions = self._with_evidence(unions)
        self._scored = {}

        def event_of(edge: _Edge) -> tuple[str, datetime | None]:
            source = new.get(edge.record_l) or new.get(edge.record_r)
            return (source[0], source[1]) if source else ("", None)

        for edge, kind, _ in unions:
            if kind == "record_linked":
                survivor = person_of_root[member_of[edge.record_l]]
                _log(log, kind, survivor, None, edge.rule, *event_of(edge), edge)
        # The first merge that joined each merged-away person, found in one pass.
        merged_by: dict[str, _Edge] = {}
        for edge, kind, joined in unions:
            if kind == "merge":
                for joined_person in joined:
                    merged_by.setdefault(joined_person, edge)
        for loser, survivor in sorted(merged.items()):
            edge = merged_by[loser]
            _log(log, "merge", survivor, loser, edge.rule, *event_of(edge), edge)
        touched = {person[r] for r in new} | set(merged.values())
        return Resolution(
            person_of=[index.person_of[r] for r in record_of],
            merged=merged,
            moved={},
            touched=touched,
            log=log,
        )

    def _with_evidence(self, unions: list[tuple[_Edge, str, frozenset[str]]]) -> list:
        """Attach each comparison's level and weight (from this batch's scoring) to the
        Splink links that joined persons: the evidence `explain` shows."""
        model = self.model
        if model is None or not self._scored:
            return unions
        out = []
        for edge, kind, joined in unions:
            row = self._scored.get((edge.record_l, edge.record_r))
            if edge.rule == "splink" and row is not None:
                evidence = {
                    c: {
                        "level": model.level_label(c, row[f"gamma_{c}"]),
                        "match_weight": row[f"w_{c}"],
                    }
                    for c in model.comparisons
                    if row[f"gamma_{c}"] != -1
                }
                edge = edge._replace(evidence=evidence)
            out.append((edge, kind, joined))
        return out

    def _write(self, new, person, created, moved, edges, unions) -> None:
        # Sorted by key: the primary-key index takes a sorted batch fastest.
        order = sorted(new)
        rows: dict[str, list[Any]] = {
            "record_id": order,
            "person_id": [person[r] for r in order],
            "first_ts": [new[r][1] for r in order],
            "first_event": [new[r][0] for r in order],
        }
        # The index holds each new record's fields as a tuple (RECORD_FIELDS order) by now:
        # the columns are those tuples transposed.
        fields = self.index.fields
        columns = zip(*(fields[r] for r in order), strict=True)
        for name, values in zip(RECORD_FIELDS, columns, strict=True):
            rows[name] = pa.array(values, pa.string())
        # Each table below is read by a statement by its local name (a replacement scan).
        _new_records = _table(rows)
        _new_persons = self._person_rows(created, self.index.born)
        _new_moves = self._move_rows(moved)
        _new_edges = None
        # Every Splink link above the threshold is kept; rule links only where they joined
        # (the rule itself finds the others again when a component is re-clustered).
        used = {(e.record_l, e.record_r) for e, _, _ in unions}
        stored = [e for e in edges if e.rule == "splink" or (e.record_l, e.record_r) in used]
        if stored:
            first_ts = {r: v[1] for r, v in new.items()}
            _new_edges = _table(
                {
                    "record_l": [e.record_l for e in stored],
                    "record_r": [e.record_r for e in stored],
                    "rule": [e.rule for e in stored],
                    "match_weight": pa.array([e.match_weight for e in stored], pa.float64()),
                    "match_probability": pa.array(
                        [e.match_probability for e in stored], pa.float64()
                    ),
                    "evidence": pa.array(
                        [orjson.dumps(e.evidence).decode() if e.evidence else None for e in stored],
                        pa.string(),
                    ),
                    "status": ["active"] * len(stored),
                    "ts": [
                        None
                        if e.rule == "splink"
                        else first_ts.get(e.record_l, first_ts.get(e.record_r))
                        for e in stored
                    ],
                },
            )
        # The batch's writes in one call: one trip into DuckDB instead of one per table.
        self.conn.execute(
            ";\n".join(
                f"INSERT INTO {table} BY NAME SELECT * FROM {name}"
                for table, name, batch in (
                    ("id_records_base", "_new_records", _new_records),
                    ("id_persons", "_new_persons", _new_persons),
                    ("id_record_moves", "_new_moves", _new_moves),
                    ("id_edges", "_new_edges", _new_edges),
                )
                if batch is not None
            )
        )
        self._fold_if_due()

    def _add_persons(
        self,
        created: list[tuple[str, datetime, str, str]],
        known: dict[str, Any] | None = None,
    ) -> None:
        """Remember new persons: (person_id, first_ts, first_event, founding record). A
        person already stored keeps its row; `known` (the index's persons, when the caller
        has them) says which are, otherwise the store does."""
        _new_persons = self._person_rows(created, known)  # read by its name below
        if _new_persons is None:
            return
        where = (
            ""
            if known is not None
            else " WHERE person_id NOT IN (SELECT person_id FROM id_persons)"
        )
        self.conn.execute(f"INSERT INTO id_persons BY NAME SELECT * FROM _new_persons{where}")

    def _person_rows(
        self, created: list[tuple[str, datetime, str, str]], known: dict[str, Any] | None
    ) -> pa.Table | None:
        """The rows of `id_persons` for `created` (each person once, none of `known`), or
        None if there are none."""
        rows = {}
        for person in created:
            if person[0] not in rows and (known is None or person[0] not in known):
                rows[person[0]] = person
        if not rows:
            return None
        return _table(
            {
                "person_id": list(rows),
                "first_ts": [c[1] for c in rows.values()],
                "first_event": [c[2] for c in rows.values()],
                "founder": [c[3] for c in rows.values()],
            }
        )

    def _repoint(self, target: dict[str, str]) -> None:
        """Give records (the keys of `target`) a new person (its values): appended moves,
        folded into a fresh base table once there are FOLD_MOVES of them."""
        _new_moves = self._move_rows(target)  # read by its name below
        if _new_moves is None:
            return
        self.conn.execute("INSERT INTO id_record_moves BY NAME SELECT * FROM _new_moves")
        self._fold_if_due()

    def _move_rows(self, target: dict[str, str]) -> pa.Table | None:
        """The rows of `id_record_moves` that give records (the keys of `target`) a new
        person (its values), counted as written; None if there are none."""
        if not target:
            return None
        if self._moves is None or self._last_seq is None:
            # Once per start (and after a rollback or an erasure): the moves' count and
            # their last number, kept here after that instead of read every batch.
            ((self._moves, self._last_seq),) = self.conn.execute(
                "SELECT count(*), coalesce(max(seq), 0) FROM id_record_moves"
            ).fetchall()
        # Numbered after the last move, in record order: the same store whatever order
        # the batch found its moves in.
        sources = sorted(target)
        first = self._last_seq + 1
        self._last_seq += len(sources)
        self._moves += len(sources)
        return _table(
            {
                "record_id": sources,
                "person_id": [target[s] for s in sources],
                "seq": pa.array(range(first, first + len(sources)), pa.int64()),
            }
        )

    def _fold_if_due(self) -> None:
        if self._moves is not None and self._moves >= FOLD_MOVES:
            self.fold_moves()

    def fold_moves(self) -> None:
        """Write every record's current person into a fresh copy of the base table (in
        arrival order) and empty the moves: readers of `id_records` see no change."""
        self.conn.execute(
            """CREATE OR REPLACE TABLE id_records_folded AS
               SELECT * FROM id_records ORDER BY first_ts, record_id"""
        )
        self.conn.execute("DROP TABLE id_records_base")
        self.conn.execute("ALTER TABLE id_records_folded RENAME TO id_records_base")
        # A fresh table rather than a DELETE: nothing of the old rows stays behind.
        self.conn.execute(f"CREATE OR REPLACE TABLE id_record_moves ({_MOVES_COLUMNS})")
        self._moves = 0
        self._last_seq = 0

    # -- unmerge -----------------------------------------------------------------------------

    def reject_link(
        self, record_a: str, record_b: str, reason: str, key: str, ts: datetime
    ) -> Resolution:
        """An operator says two records are not one person: never link them, re-cluster.

        In: the two record ids, the operator's reason, the command's key and time. Out: the
        Resolution of re-clustering their persons (splits and the records they moved).
        """
        persons = self._persons_of([record_a, record_b])
        missing = {record_a, record_b} - set(persons)
        if missing:
            raise KeyError(f"unknown record(s): {', '.join(sorted(missing))}")
        left, right = sorted((record_a, record_b))
        self.conn.execute(
            "INSERT OR REPLACE INTO id_cannot_link VALUES (?, ?, ?, ?)", [left, right, reason, ts]
        )
        if self._index is not None:
            self._index.cannot.add(frozenset((left, right)))
        self.conn.execute(
            "UPDATE id_edges SET status = 'rejected' WHERE record_l = ? AND record_r = ?",
            [left, right],
        )
        log: list[dict[str, Any]] = LinkLog()
        _log(
            log,
            "link_rejected",
            persons[left],
            persons[right],
            reason,
            key,
            ts,
            _Edge(left, right, "operator"),
        )
        return self.recluster(set(persons.values()), key, ts, log)

    def erase_records(self, record_ids: list[str], key: str, ts: datetime) -> Resolution:
        """Remove records (an erasure) and re-cluster what remains of their persons.

        Links that only those records made disappear with them: the rest splits back into
        the persons it was before, with their old ids.
        """
        persons = self._persons_of(record_ids)
        if not persons:
            return Resolution([], {}, {}, set(), [])
        self.conn.register("_erased", pa.table({"record_id": list(persons)}))
        try:
            for table, columns in (
                ("id_records_base", ("record_id",)),
                ("id_record_moves", ("record_id",)),
                ("id_edges", ("record_l", "record_r")),
                ("id_cannot_link", ("record_l", "record_r")),
            ):
                where = " OR ".join(f"{c} IN (SELECT record_id FROM _erased)" for c in columns)
                self.conn.execute(f"DELETE FROM {table} WHERE {where}")
        finally:
            self.conn.unregister("_erased")
        self.forget()  # erased records leave the candidate index with the next rebuild
        log: list[dict[str, Any]] = LinkLog()
        for person in sorted(set(persons.values())):
            _log(log, "records_erased", person, None, "erasure", key, ts, None)
        return self.recluster(set(persons.values()), key, ts, log)

    def recluster(
        self,
        persons: set[str],
        key: str,
        ts: datetime,
        log: list[dict[str, Any]] | None = None,
    ) -> Resolution:
        """Cluster the records of `persons` again from their evidence; split what no longer holds.

        Every piece keeps the id of the oldest person that founded one of its records, so
        a split gives persons back the ids they had before they merged.
        """
        log = LinkLog() if log is None else log
        self.conn.register("_persons", pa.table({"person_id": sorted(persons)}))
        try:
            rows = self.conn.execute(
                f"""SELECT record_id, person_id, first_ts, first_event, {", ".join(STRONG_FIELDS)}
                    FROM id_records WHERE person_id IN (SELECT person_id FROM _persons)
                    ORDER BY first_ts, first_event, record_id"""
            ).fetchall()
        finally:
            self.conn.unregister("_persons")
        old = {r[0]: r[1] for r in rows}
        clusters = {
            r[0]: _Cluster({r[0]}, _ids_of(dict(zip(STRONG_FIELDS, r[4:], strict=True))))
            for r in rows
        }
        member_of = {r: r for r in clusters}
        edges: list[_Edge] = []
        for position, name in enumerate(STRONG_FIELDS):
            anchors: dict[str, str] = {}
            for row in rows:
                value = row[4 + position]
                if value is None:
                    continue
                if value in anchors:
                    edges.append(_Edge(row[0], anchors[value], _SHARED[name]))
                else:
                    anchors[value] = row[0]
        threshold = self.model.threshold if self.model else 1.0
        for record_l, record_r, weight, probability in self.conn.execute(
            """SELECT record_l, record_r, match_weight, match_probability FROM id_edges
               WHERE status = 'active' AND rule = 'splink' AND match_probability >= ?""",
            [threshold],
        ).fetchall():
            if record_l in old and record_r in old:
                edges.append(_Edge(record_l, record_r, "splink", weight, probability))
        cannot = self._cannot_links(set(old))
        for edge in _ordered(edges):
            a, b = member_of[edge.record_l], member_of[edge.record_r]
            if a == b or self._conflict(clusters[a], clusters[b], cannot):
                continue
            keep, gone = (a, b) if len(clusters[a].records) >= len(clusters[b].records) else (b, a)
            clusters[keep].records |= clusters[gone].records
            for id_type, values in clusters[gone].ids.items():
                clusters[keep].ids.setdefault(id_type, set()).update(values)
            for record in clusters.pop(gone).records:
                member_of[record] = keep
        founders = dict(
            self.conn.execute(
                "SELECT founder, person_id FROM id_persons WHERE founder IN (SELECT unnest(?))",
                [list(old)],
            ).fetchall()
        )
        ages = self._ages(set(founders.values()))
        first = {r[0]: (r[2], r[3]) for r in rows}
        moved: dict[str, str] = {}
        created = []
        for cluster in clusters.values():
            owners = [founders[r] for r in cluster.records if r in founders]
            if owners:
                person = min(owners, key=lambda p: ages[p])
            else:
                oldest = min(cluster.records, key=lambda r: (*first[r], r))
                person = person_id_for(first[oldest][1])
                created.append((person, first[oldest][0], first[oldest][1], oldest))
            for record in cluster.records:
                if old[record] != person:
                    moved[record] = person
        self._add_persons(created)
        self._repoint(moved)  # the records a split moved
        if self._index is not None:
            for person, first_ts, _, founder in created:
                if person not in self._index.born:  # the row `_add_persons` wrote
                    self._index.found(founder, person)
                self._index.born[person] = (first_ts, person)
            for record, person in moved.items():
                self._index.assign(record, person)
        pieces: dict[tuple[str, str], list[str]] = {}
        for record, person in sorted(moved.items()):
            pieces.setdefault((old[record], person), []).append(record)
        for (source, target), records in sorted(pieces.items()):
            _log(log, "split", source, target, "recluster", key, ts, None)
            log[-1]["detail"]["records"] = records
        return Resolution(
            person_of=[],
            merged={},
            moved=moved,
            touched=set(old.values()) | set(moved.values()),
            log=log,
        )

    # -- reading -----------------------------------------------------------------------------

    def records_of_persons(self, persons: list[str]) -> list[tuple] | None:
        """The identity records of `persons` now as rows (person_id, record_id, then the
        STRONG_FIELDS' values), from the in-memory index: what selecting them from
        `id_records` gives, without reading the store. None while the index is not loaded
        (the caller reads the store)."""
        index = self._index
        if index is None:
            return None
        fields, members = index.fields, index.members
        width = len(STRONG_FIELDS)
        return [
            (person, record, *fields[record][:width])
            for person in persons
            for record in members.get(person, ())
        ]

    def merged_into(self, persons: list[str]) -> dict[str, list[str]] | None:
        """Those of `persons` others merged into, each with the persons founded by one of
        its records now (`id_persons.founder`) other than itself, sorted; from the in-memory
        index. None while the index is not loaded, or if a record founded more than one
        person (the caller reads the store)."""
        index = self._index
        if index is None or not index.founders_unique:
            return None
        founded, members = index.founded, index.members
        merged = {}
        for person in persons:
            others = {
                founder_of
                for record in members.get(person, ())
                if (founder_of := founded.get(record)) is not None and founder_of != person
            }
            if others:
                merged[person] = sorted(others)
        return merged

    def person_of_record(self, record_id: str) -> str | None:
        """The person a record belongs to now, or None."""
        return self._persons_of([record_id]).get(record_id)

    def person_of(self, id_type: str, value: str) -> str | None:
        """The person of the oldest record holding identifier `id_type`:`value`, or None."""
        if id_type not in STRONG_FIELDS:
            raise ValueError(f"{id_type!r} is not an identifier type")
        rows = self.conn.execute(
            f"SELECT person_id FROM id_records WHERE {id_type} = ? ORDER BY first_ts, record_id LIMIT 1",
            [value],
        ).fetchall()
        return rows[0][0] if rows else None

    def clusters(self) -> dict[str, str]:
        """Every record's person (record_id -> person_id)."""
        return dict(self.conn.execute("SELECT record_id, person_id FROM id_records").fetchall())


@functools.cache
def unfreeze_at_exit() -> None:
    """Hand frozen objects back to the collector when the interpreter exits, so the
    shutdown frees them as usual (extension types report frozen ones as leaked); registered
    once, however often objects are frozen."""
    atexit.register(gc.unfreeze)


def _table(columns: dict[str, Any]) -> pa.Table:
    """An Arrow table from columns of Python values (or Arrow arrays), each column typed
    as `pa.array` infers it: the same table `pa.table` makes from the lists, a few times
    faster than handing it the lists."""
    return pa.table(
        {
            name: values if isinstance(values, pa.Array) else pa.array(values)
            for name, values in columns.items()
        }
    )


def _ids_of(fields: dict[str, str | None]) -> dict[str, set[str]]:
    return {name: {fields[name]} for name in STRONG_FIELDS if fields.get(name)}  # type: ignore[misc]


def _ordered(edges: list[_Edge]) -> list[_Edge]:
    deterministic = [e for e in edges if e.rule != "splink"]
    probabilistic = [e for e in edges if e.rule == "splink"]
    deterministic.sort(key=lambda e: _SHARED_RANK[e.rule])  # stable: arrival order
    probabilistic.sort(key=lambda e: (-(e.match_weight or 0.0), e.record_l, e.record_r))
    return deterministic + probabilistic


def _person(cluster: _Cluster) -> str | None:
    return min(cluster.persons) if cluster.persons else None


class LinkLog(list):
    """Identity events in order, numbering each event key's entries as they are added."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def number(self, key: str) -> int:
        n = self.counts.get(key, 0)
        self.counts[key] = n + 1
        return n


def _log(
    log: LinkLog,
    kind: str,
    person: str | None,
    other: str | None,
    rule: str,
    key: str,
    ts: datetime | None,
    edge: _Edge | None,
    record: str | None = None,
) -> None:
    detail: dict[str, Any] = {}
    if record:
        detail["record_id"] = record
    if edge is not None:
        detail.update(record_l=edge.record_l, record_r=edge.record_r)
        if edge.match_weight is not None:
            detail.update(
                match_weight=edge.match_weight,
                match_probability=edge.match_probability,
                comparisons=edge.evidence,
            )
    log.append(
        {
            # Numbered within the event, so ids do not depend on how events were batched.
            "link_id": f"{key}:{kind}:{log.number(key)}",
            "kind": kind,
            "person_id": person,
            "other_person_id": other,
            "rule": rule,
            "event_key": key,
            "ts": ts,
            "detail": detail,
        }
    )


@dataclass
class ReplayResult:
    """What streaming a file through the resolver gave: clusters and per-batch latency."""

    person_of: dict[str, str]  # input id -> person id
    batch_seconds: list[float]
    records: int


def replay(
    rows: Iterable[tuple[str, dict[str, str | None]]],
    model: ScoringModel | None,
    batch_size: int = 1000,
    conn: duckdb.DuckDBPyConnection | None = None,
) -> ReplayResult:
    """Stream (input id, normalised record) rows in order through the worker's resolver.

    Each batch is one transaction, exactly as the pipeline runs it; the input id plays the
    event key. Out: every input id's person after the whole stream, and batch latencies.
    """
    if conn is None:
        conn = duckdb.connect()
        # A batch's queries are small: DuckDB's worker threads cost more in hand-offs than
        # they save, and on a busy machine each waits for a core.
        conn.execute("SET threads = 1")
    conn.execute("SET TimeZone = 'UTC'")
    resolver = IdentityResolver(conn, model)
    clock = datetime(2000, 1, 1, tzinfo=UTC)
    record_of: dict[str, str] = {}
    seconds: list[float] = []
    batch: list[tuple[str, datetime, dict[str, str | None]]] = []
    batch_ids: list[str] = []

    def flush() -> None:
        started = time.perf_counter()
        conn.execute("BEGIN TRANSACTION")
        resolver.resolve(batch, batch_ids)
        conn.execute("COMMIT")
        batch.clear()
        batch_ids.clear()
        # What the index gained lives as long as the replay: keep full collections from
        # scanning it again after every batch (they cost a fifth of the replay's time).
        gc.freeze()
        seconds.append(time.perf_counter() - started)

    # The input and everything imported outlive the replay too. Frozen objects are still
    # freed by reference counting; unfreezing at the end hands any cyclic garbage of the
    # batches back to the collector.
    frozen = gc.get_freeze_count()
    gc.freeze()
    try:
        for count, (input_id, fields) in enumerate(rows):
            # File order is arrival order: a record's time is its position.
            batch.append((input_id, clock + timedelta(microseconds=count), fields))
            record_of[input_id] = record_id = record_id_of(fields)
            batch_ids.append(record_id)
            if len(batch) >= batch_size:
                flush()
        if batch:
            flush()
    finally:
        if not frozen:
            gc.unfreeze()
    clusters = resolver.clusters()
    return ReplayResult({i: clusters[r] for i, r in record_of.items()}, seconds, len(record_of))
