"""The consent gate: decides, per event, whether the subject consented to the purpose it serves.

Consent is recorded per identifier and purpose, latest timestamp wins (out-of-order
consent events resolve by their own time; of two at the same time, the later to arrive).
An event is decided by, in order: the preferences it carries itself
(`context.consent.categoryPreferences`), the latest stored consent of any of its
identifiers (of equally recent ones, a refusal: the profile builder resolves a person's
identifiers the same way), then the policy's default for its jurisdiction.
Before all of that, an event of an erased subject from before the erasure is withheld.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache
from itertools import islice
from operator import itemgetter
from typing import Any, NamedTuple

import duckdb
import pyarrow as pa

from consent.erasure import ERASED, erased_before
from consent.erasure import SCHEMA_SQL as ERASURE_SCHEMA_SQL
from consent.ledger import rewrite_table
from consent.policy import PurposePolicy
from identity.normalise import Identifier
from pipelines.stored_keys import StoredKeys

ALLOWED = "allowed"
WITHHELD = "withheld"
CONSENT_RECORDED = "consent_recorded"

# One row per (id_type, id_value, purpose). The gate alone writes the table, and it writes a
# value's rows whole from its own copy, which holds one record per key: the uniqueness is
# the gate's, not an index's. A primary key's index cost more than the rows themselves: a
# batch restates ~40% of the rows (carried preferences renew their time and event key), and
# deleting and inserting 7,600 of them cost ~37 ms with the index (delete 5.5, insert 16,
# commit 15) against ~8 ms without (DuckDB 2.0); no reader looks a row up by its key.
_COLUMNS = """
    id_type VARCHAR NOT NULL, id_value VARCHAR NOT NULL, purpose VARCHAR NOT NULL,
    status VARCHAR, ts TIMESTAMPTZ, source VARCHAR, policy_version VARCHAR,
    jurisdiction VARCHAR, event_key VARCHAR
"""
SCHEMA_SQL = f"CREATE TABLE IF NOT EXISTS consent_state ({_COLUMNS});"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_STATE_SCHEMA = pa.schema(
    [
        ("id_type", pa.string()),
        ("id_value", pa.string()),
        ("purpose", pa.string()),
        ("status", pa.string()),
        ("ts", pa.timestamp("us", tz="UTC")),
        ("source", pa.string()),
        ("policy_version", pa.string()),
        ("jurisdiction", pa.string()),
        ("event_key", pa.string()),
    ]
)


class ConsentRecord(NamedTuple):
    """One statement of consent by a subject for a purpose at a time.

    A named tuple: the gate makes one per statement per event (four an event, when the
    event carries preferences), and a tuple is built in a fifth of a frozen dataclass's time.
    """

    purpose: str
    status: str
    ts: datetime
    source: str
    policy_version: str | None
    jurisdiction: str | None
    event_key: str


# The getter of each field of a tuple, by position.
_FIELD = [itemgetter(i) for i in range(len(ConsentRecord._fields))]


class GateDecision(NamedTuple):
    """What the gate decided for one event and why (the lineage entry is built from this)."""

    decision: str  # allowed | withheld | consent_recorded
    purpose: str | None
    # no-consent-needed | event-preferences | stored-consent | jurisdiction-default | erased-subject
    basis: str
    consent_ref: str | None  # the event key of the consent statement relied on
    jurisdiction: str | None


_NO_CONSENT_NEEDED = GateDecision(ALLOWED, None, "no-consent-needed", None, None)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def event_country(event: dict[str, Any]) -> str | None:
    country = _dict(_dict(event.get("context")).get("location")).get("country")
    return country if isinstance(country, str) else None


def carried_preferences(event: dict[str, Any]) -> dict[str, bool]:
    """The consent preferences an event carries in `context.consent.categoryPreferences`."""
    # Asked twice an event (the gate, its lineage entry): plain lookups, no helper calls.
    context = event.get("context")
    consent = context.get("consent") if isinstance(context, dict) else None
    prefs = consent.get("categoryPreferences") if isinstance(consent, dict) else None
    if not isinstance(prefs, dict):
        return {}
    for value in prefs.values():
        if value is not True and value is not False:
            return {k: v for k, v in prefs.items() if isinstance(v, bool)}
    return prefs  # all booleans (the usual case): the event's own mapping, read, never changed


def stated_consent(kind: str | None, event: dict[str, Any]) -> list[dict[str, Any]]:
    """The consent statements an event makes: a consent event's one, or the preferences it
    carries (source `event-context`). Each: purpose, status, source, policy_version,
    jurisdiction. This is what the gate records and what the lineage entry keeps."""
    if kind == "consent_change":
        consent = event["consent"]
        return [
            {
                "purpose": consent["purpose"],
                "status": consent["status"],
                "source": consent["source"],
                "policy_version": consent.get("policyVersion"),
                "jurisdiction": consent.get("jurisdiction"),
            }
        ]
    prefs = carried_preferences(event)
    return list(_carried_statements(tuple(prefs.items()))) if prefs else []


@lru_cache(maxsize=1024)  # a few sets of preferences recur across a whole stream
def _carried_statements(prefs: tuple[tuple[str, bool], ...]) -> tuple[dict[str, Any], ...]:
    # Shared by every event stating the same preferences: read, never changed.
    return tuple(
        {
            "purpose": purpose,
            "status": "granted" if granted else "denied",
            "source": "event-context",
            "policy_version": None,
            "jurisdiction": None,
        }
        for purpose, granted in prefs
    )


def _drop_key(conn: duckdb.DuckDBPyConnection) -> None:
    """Rewrite, once, a consent state created with a primary key (an index cannot be
    dropped from a table in DuckDB): the same rows, in one transaction."""
    if not conn.execute(
        "SELECT 1 FROM duckdb_constraints() WHERE table_name = 'consent_state' "
        "AND database_name = current_database() AND schema_name = current_schema() "
        "AND constraint_type = 'PRIMARY KEY'"
    ).fetchall():
        return
    rewrite_table(conn, "consent_state", _COLUMNS)


class ConsentGate:
    """Consent state in DuckDB plus the decision rule; decides a whole batch at once.

    The stored consent of the identifier values recent batches named is kept in memory
    between batches (`forget` drops it), so a batch reads only the values it has not seen.
    The copy is the state's as of the caller's open transaction: whoever rolls that back,
    or changes `consent_state` other than through `decide` (erasure), must call `forget`.
    """

    # Identifier values whose stored consent is kept: about 1 KB each with four purposes'
    # rows (measured), so ~50 MB at most; past it, the values longest unused are dropped
    # after a batch (at 5,000 events/s, about half a minute of distinct subjects).
    KEPT_VALUES = 50_000

    def __init__(
        self, conn: duckdb.DuckDBPyConnection, policy: PurposePolicy, kept_values: int = KEPT_VALUES
    ) -> None:
        self.conn = conn
        self.policy = policy
        self.kept_values = kept_values
        # Identifiers whose consent the last `decide` changed: their persons' views rebuild.
        self.last_changed: set[Identifier] = set()
        # The stored rows of every kept value (under any identifier type), by key, and each
        # kept value's keys, least recently used first: a value is kept whole or not at all.
        self._state: dict[tuple[Identifier, str], ConsentRecord] = {}
        self._keys_of: dict[str, list[tuple[Identifier, str]]] = {}
        # Whether `erased_subjects` is known to be empty (None: not known).
        self._none_erased: bool | None = None
        # The hashes of the identifier values `consent_state` may hold: a value whose hash
        # is not held has no rows, and is not looked for (a new subject's, most of those a
        # batch does not keep: each look was a scan of the table's values, ~20 ms for 1,100
        # values at 300,000 persons). The kept values that certainly have no rows yet.
        self._stored = StoredKeys(conn, "consent_state", "id_value")
        self._unstored: set[str] = set()
        conn.execute(SCHEMA_SQL)
        _drop_key(conn)
        conn.execute(ERASURE_SCHEMA_SQL)

    def forget(self) -> None:
        """Drop what is kept of the stored state: call it after a rollback of a transaction
        `decide` ran in, and after consent or erasure state changed by another path."""
        self._state.clear()
        self._keys_of.clear()
        self._none_erased = None
        # The stored values' hashes stay: a rollback or an erasure only takes rows away, so
        # they still hold every stored value (a value they hold without rows is looked for
        # and found to have none).
        self._unstored.clear()

    def _load(self, values: set[str]) -> None:
        """Keep the stored consent of `values` (all their rows, whatever the identifier type)."""
        if not values:
            return
        wanted = pa.table({"id_value": list(values)})
        maybe = self._stored.maybe_stored(wanted)
        rows: list[tuple] = []
        if maybe:
            if len(maybe) < len(values):
                wanted = pa.table({"id_value": maybe})
            rows = self._read(wanted)
        state, keys_of = self._state, self._keys_of
        for value in values:
            keys_of[value] = []
        # An event's statements share its time (a purpose per preference, for each of its
        # identifiers): each stored time becomes a datetime once.
        times: dict[int, datetime] = {}
        for r in rows:
            key = (Identifier(r[0], r[1]), r[2])
            ts = times.get(r[4])
            if ts is None:
                ts = times[r[4]] = _EPOCH + timedelta(microseconds=r[4])
            state[key] = ConsentRecord(r[2], r[3], ts, r[5], r[6], r[7], r[8])
            keys_of[r[1]].append(key)
        self._unstored.update(value for value in values if not keys_of[value])

    def _read(self, wanted: pa.Table) -> list[tuple]:
        """The stored rows of the values in `wanted` (its one column, `id_value`)."""
        _gate_ids = wanted  # read by its local name (a replacement scan): no register
        # Matched on the value alone: the whole table is scanned either way, and hashing
        # one column of each row instead of two, with no join output to build, cost two
        # thirds as much (DuckDB 2.0, 982,000 rows). The time as epoch microseconds:
        # DuckDB's own TIMESTAMPTZ conversion (pytz per row) cost half again as much as
        # building the datetime here.
        return self.conn.execute(
            """SELECT s.id_type, s.id_value, s.purpose, s.status, epoch_us(s.ts), s.source,
                      s.policy_version, s.jurisdiction, s.event_key
               FROM consent_state s WHERE s.id_value IN (SELECT id_value FROM _gate_ids)"""
        ).fetchall()

    def _any_erased(self) -> bool:
        if self._none_erased is None:
            self._none_erased = not self.conn.execute(
                "SELECT 1 FROM erased_subjects LIMIT 1"
            ).fetchall()
        return not self._none_erased

    def decide(
        self,
        items: list[tuple[str, str, dict[str, Any], datetime, list[Identifier]]],
    ) -> list[GateDecision]:
        """Decide a batch and record the consent it carries.

        In: (event_key, kind, event, timestamp, identifiers) per event, in stream order.
        Out: one GateDecision per item. Consent statements (consent events and carried
        preferences) update the stored state in the caller's transaction.
        """
        keys_of = self._keys_of
        self._load({i.value for item in items for i in item[4]}.difference(keys_of))
        state = self._state
        # The identifiers of the keys a statement changed, repeats and all: the set is built
        # once, after the batch (a list append per key, not another hash of the key).
        changed: list[Identifier] = []
        touched = changed.append

        get = state.get

        def remember(ids: list[Identifier], record: ConsentRecord) -> None:
            purpose, ts, status = record.purpose, record.ts, record.status
            for identifier in ids:
                key = (identifier, purpose)
                current = get(key)
                # An older statement loses. A restatement keeps the newer time: a statement
                # older than it but newer than the first must still lose (out of order).
                if current is None:
                    keys_of[identifier.value].append(key)
                elif ts < current.ts or (ts == current.ts and current.status == status):
                    continue
                state[key] = record
                touched(identifier)

        decisions: list[GateDecision] = []
        purpose_of = self.policy.event_purposes.get
        # A jurisdiction default depends on the country and purpose alone: one decision
        # object per pair, shared by every event it decides (decisions are immutable).
        defaults: dict[tuple[str | None, str], GateDecision] = {}
        # (ts, ids) each; no statement at all while nobody has been erased.
        erased = (
            erased_before(self.conn, [item[3:] for item in items])
            if self._any_erased()
            else [None] * len(items)
        )
        for (event_key, kind, event, ts, ids), erasure in zip(items, erased, strict=True):
            if erasure is not None:
                # An erased subject's event from before the erasure (a replay, a late
                # delivery): withheld, and its consent statements are not recorded again.
                decisions.append(GateDecision(WITHHELD, ERASED, "erased-subject", erasure, None))
                continue
            if kind == "consent_change":
                record = ConsentRecord(ts=ts, event_key=event_key, **stated_consent(kind, event)[0])
                remember(ids, record)
                decisions.append(
                    GateDecision(
                        CONSENT_RECORDED,
                        record.purpose,
                        "consent-event",
                        event_key,
                        record.jurisdiction,
                    )
                )
                continue
            # The preferences the event carries are its consent statements (as in
            # `stated_consent`), remembered before the event itself is decided.
            prefs = carried_preferences(event)
            for stated, granted in prefs.items():
                status = "granted" if granted else "denied"
                remember(
                    ids, ConsentRecord(stated, status, ts, "event-context", None, None, event_key)
                )
            purpose = purpose_of(kind)
            if purpose is None:
                decisions.append(_NO_CONSENT_NEEDED)
                continue
            if purpose in prefs:
                decisions.append(
                    GateDecision(
                        ALLOWED if prefs[purpose] else WITHHELD,
                        purpose,
                        "event-preferences",
                        event_key,
                        None,
                    )
                )
                continue
            latest = None
            for identifier in ids:
                held = state.get((identifier, purpose))
                # Of equally recent statements under different identifiers, a refusal
                # wins, whatever the identifiers' order (as `ProfileBuilder` resolves them).
                if held is not None and (
                    latest is None
                    or held.ts > latest.ts
                    or (
                        held.ts == latest.ts
                        and latest.status == "granted"
                        and held.status != "granted"
                    )
                ):
                    latest = held
            if latest is not None:
                decisions.append(
                    GateDecision(
                        ALLOWED if latest.status == "granted" else WITHHELD,
                        purpose,
                        "stored-consent",
                        latest.event_key,
                        latest.jurisdiction,
                    )
                )
                continue
            country = event_country(event)
            decision = defaults.get((country, purpose))
            if decision is None:
                jurisdiction = self.policy.jurisdiction_of(country)
                status = self.policy.default_status(jurisdiction, purpose)
                decision = GateDecision(
                    ALLOWED if status == "granted" else WITHHELD,
                    purpose,
                    "jurisdiction-default",
                    None,
                    jurisdiction,
                )
                defaults[(country, purpose)] = decision
            decisions.append(decision)
        identifiers = set(changed)
        self._store(identifiers)
        self.last_changed = identifiers
        return decisions

    def _store(self, changed: set[Identifier]) -> None:
        """Write the rows of the values of the identifiers whose consent changed: all of them
        deleted by value, then inserted from the kept state. Then drop the values longest
        unused past the bound."""
        keys_of, state, unstored = self._keys_of, self._state, self._unstored
        if changed:
            values = {identifier.value for identifier in changed}
            new = values & unstored
            keys = [key for value in values for key in keys_of[value]]
            # Columns by an item getter mapped over the tuples (identifiers, records), in C: a
            # ConsentRecord's fields are `_STATE_SCHEMA`'s after the identifier, in its order.
            # (Transposing them with `zip(*rows)` made an iterator per row: 2-5x the time in a
            # large heap, where the allocations set off the garbage collector.)
            identifiers = [identifier for identifier, _ in keys]
            records = list(map(state.__getitem__, keys))
            columns = [list(map(_FIELD[i], identifiers)) for i in range(2)]
            columns += [list(map(_FIELD[i], records)) for i in range(len(ConsentRecord._fields))]
            # Read by its local name (a replacement scan): no register and unregister.
            _gate_changed = pa.table(columns, schema=_STATE_SCHEMA)
            # Every row of a touched value, by the value alone: one column hashed per stored
            # row, where the whole key cost twice that, and deleting by the rowids a load had
            # read needed that load (a scan with every column). The rows of the value left
            # unchanged are inserted again as they were. INSERT OR REPLACE over rows that
            # mostly exist cost ten times a delete and insert (DuckDB 2.0). A batch of new
            # subjects alone deletes nothing (the delete scans the table). Both statements
            # go to DuckDB in one call.
            insert = "INSERT INTO consent_state SELECT * FROM _gate_changed"
            if len(new) < len(values):
                insert = (
                    "DELETE FROM consent_state "
                    "WHERE id_value IN (SELECT id_value FROM _gate_changed);\n" + insert
                )
            self.conn.execute(insert)
            if new:
                self._stored.hold(pa.table({"id_value": list(new)}))
                unstored.difference_update(new)
            for value in values:  # used last: kept longest
                keys_of[value] = keys_of.pop(value)
        excess = len(keys_of) - self.kept_values
        if excess > 0:
            for value in list(islice(keys_of, excess)):
                unstored.discard(value)
                for key in keys_of.pop(value):
                    del state[key]
