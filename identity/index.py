"""The candidate index: which stored records a new record must be compared with, and whose they are.

A cache, in memory, of what the identity store already holds: per strong identifier the
record that first held each value (deterministic links), per blocking rule the records
holding each key (probabilistic candidates), per term-frequency column the count of each
value, every record's fields, every record's person, every person's records and age, and
the operators' rejected links. Built from DuckDB on first use, updated as batches
resolve, and dropped when a batch rolls back (the next batch rebuilds it), so it never
disagrees with the store for longer than one failed batch. Looking a key up costs the
same at a thousand records as at a million; a join against the store would read the
whole table per batch.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import datetime
from operator import itemgetter

import duckdb

from identity.records import ATTRIBUTE_FIELDS, RECORD_FIELDS, STRONG_FIELDS

Fields = dict[str, str | None]


class CandidateIndex:
    """Anchors per strong identifier, records per blocking key, counts per term."""

    def __init__(self, rules: list[tuple[str, ...]], tf_columns: list[str]) -> None:
        self.rules = rules
        self.tf_columns = tf_columns
        self.anchors: dict[str, dict[str, str]] = {name: {} for name in STRONG_FIELDS}
        self.blocks: list[dict[tuple[str, ...], list[str]]] = [defaultdict(list) for _ in rules]
        self.terms: dict[str, dict[str, int]] = {c: defaultdict(int) for c in tf_columns}
        self.totals: dict[str, int] = dict.fromkeys(tf_columns, 0)
        self._key_getters = [_key_getter(rule) for rule in rules]
        # record -> its fields (RECORD_FIELDS order: STRONG_FIELDS, then ATTRIBUTE_FIELDS);
        # attribute values are interned: a million records hold a few thousand distinct
        # names, cities and dates.
        self.fields: dict[str, tuple[str | None, ...]] = {}
        self.person_of: dict[str, str] = {}  # record -> person
        self.members: dict[str, set[str]] = {}  # person -> records
        self.born: dict[str, tuple[datetime, str]] = {}  # person -> (first seen, id): its age
        # record -> the person it founded (`id_persons.founder`): who a profile merged in.
        # A record founds at most one person (a split revives the person a record founded
        # rather than found another); `founders_unique` is False if a store says otherwise.
        self.founded: dict[str, str] = {}
        self.founders_unique = True
        self.cannot: set[frozenset[str]] = set()  # record pairs an operator rejected

    @classmethod
    def load(
        cls, conn: duckdb.DuckDBPyConnection, rules: list[tuple[str, ...]], tf_columns: list[str]
    ) -> CandidateIndex:
        """Build the index from the store's records, oldest first, and their persons."""
        index = cls(rules, tf_columns)
        cursor = conn.execute(
            f"""SELECT record_id, person_id, {", ".join(RECORD_FIELDS)} FROM id_records
                ORDER BY first_ts, record_id"""
        )
        persons: dict[str, str] = {}  # one string object per person id
        while rows := cursor.fetchmany(50_000):
            records = []
            for record_id, person_id, *values in rows:
                person = persons.setdefault(person_id, person_id)
                records.append((record_id, dict(zip(RECORD_FIELDS, values, strict=True))))
                index.assign(record_id, person)
            index.add(records)
        for person_id, first_ts, founder in conn.execute(
            "SELECT person_id, first_ts, founder FROM id_persons"
        ).fetchall():
            person = persons.get(person_id, person_id)
            index.born[person] = (first_ts, person_id)
            if founder is not None:
                index.found(founder, person)
        index.cannot = {
            frozenset(pair)
            for pair in conn.execute("SELECT record_l, record_r FROM id_cannot_link").fetchall()
        }
        return index

    def found(self, record_id: str, person: str) -> None:
        """Record that `person` was founded by `record_id` (a row of `id_persons`)."""
        if self.founded.setdefault(record_id, person) != person:
            self.founders_unique = False

    def assign(self, record_id: str, person: str) -> None:
        """Record that `record_id` belongs to `person` now (moving it if it had another)."""
        old = self.person_of.get(record_id)
        if old == person:
            return
        if old is not None:
            members = self.members[old]
            members.discard(record_id)
            if not members:
                del self.members[old]
        self.person_of[record_id] = person
        self.members.setdefault(person, set()).add(record_id)

    def identifiers(self, records: Iterable[str]) -> dict[str, set[str]]:
        """The strong identifiers `records` hold between them, by type."""
        ids: dict[str, set[str]] = {}
        # A record's fields start with its strong identifiers, in STRONG_FIELDS order: the
        # records' tuples transposed give each type's values (zip stops at the shorter).
        columns = zip(*map(self.fields.__getitem__, records), strict=True)
        for name, column in zip(STRONG_FIELDS, columns, strict=False):
            values = set(column)
            values.discard(None)
            if values:
                ids[name] = values
        return ids

    def add(self, records: Iterable[tuple[str, Fields]]) -> None:
        """Index stored records (in arrival order: the first holder of a value anchors it)."""
        intern = sys.intern
        store = self.fields
        anchors = [(name, self.anchors[name]) for name in STRONG_FIELDS]
        blocks = list(zip(self._key_getters, self.blocks, strict=True))
        terms = [(column, self.terms[column]) for column in self.tf_columns]
        totals = self.totals
        for record_id, fields in records:
            get = fields.get
            store[record_id] = (
                *map(get, STRONG_FIELDS),
                *(None if v is None else intern(v) for v in map(get, ATTRIBUTE_FIELDS)),
            )
            for name, anchor in anchors:
                value = get(name)
                if value is not None and value not in anchor:
                    anchor[value] = record_id
            for key_of, block in blocks:
                key = key_of(fields)
                if None not in key:
                    block[key].append(record_id)
            for column, counts in terms:
                value = get(column)
                if value is not None:
                    counts[value] += 1
                    totals[column] += 1

    def deterministic_edges(self, new: dict[str, Fields]) -> list[tuple[str, str, str]]:
        """(new record, anchor, identifier type): each new record to the first record that
        held each of its strong identifiers, the batch's own records included."""
        edges = []
        local: dict[str, dict[str, str]] = {name: {} for name in STRONG_FIELDS}
        for record_id, fields in new.items():
            for name in STRONG_FIELDS:
                value = fields.get(name)
                if value is None:
                    continue
                anchor = self.anchors[name].get(value) or local[name].setdefault(value, record_id)
                if anchor != record_id:
                    edges.append((record_id, anchor, name))
        return edges

    def candidate_pairs(self, new: dict[str, Fields]) -> set[tuple[str, str]]:
        """Pairs (lower id, higher id) that share a blocking key: new x stored, new x new."""
        pairs: set[tuple[str, str]] = set()
        for rule, block in zip(self.rules, self.blocks, strict=True):
            local: dict[tuple[str, ...], list[str]] = defaultdict(list)
            key_of = _key_getter(rule)
            for record_id, fields in new.items():
                key = key_of(fields)
                if None in key:
                    continue
                for other in (*block.get(key, ()), *local[key]):
                    if other != record_id:
                        pairs.add((other, record_id) if other < record_id else (record_id, other))
                local[key].append(record_id)
        return pairs

    def term_frequency(self, column: str, value: str | None) -> float | None:
        """A value's share of all non-null values of its column, as Splink computes it."""
        if value is None:
            return None
        count = self.terms[column].get(value)
        return count / self.totals[column] if count else None


def _key_getter(rule: tuple[str, ...]) -> Callable[[Fields], tuple[str | None, ...]]:
    """A function from a record's fields to its key under `rule` (None inside: no key)."""
    if len(rule) == 1:
        (column,) = rule
        return lambda fields: (fields.get(column),)
    getter = itemgetter(*rule)

    def key(fields: Fields) -> tuple[str | None, ...]:
        try:
            return getter(fields)
        except KeyError:  # a record that leaves a field out has it empty
            return tuple(fields.get(c) for c in rule)

    return key
