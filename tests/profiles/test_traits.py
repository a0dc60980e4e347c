"""Computed traits: declared in YAML, maintained incrementally, exact across merges and consent."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines import topics
from pipelines.pipeline import Pipeline, SourceRecord
from profiles.store import ConsumedRecord, ProfileStore
from profiles.traits import TraitConfigError, load_traits, merge_identify_trait

START = datetime(2026, 10, 1, 8, tzinfo=UTC)
US = {"location": {"country": "US"}}
_ids = itertools.count(1)


def at(minutes: int) -> str:
    return (START + timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")


def event(kind: str, minutes: int, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"messageId": f"t-{next(_ids)}", "timestamp": at(minutes), "context": US}
    if kind == "page":
        base.update(type="page", name="home")
    elif kind == "identify":
        base.update(type="identify")
    elif kind == "consent":
        base.update(type="consent")
        base.pop("context")
    else:
        base.update(type="track", event=kind)
    return {**base, **fields}


def topic_of(e: dict[str, Any]) -> str:
    if e["type"] == "consent":
        return topics.CONSENT
    if e.get("event") in topics.TRANSACTIONAL_EVENTS:
        return topics.TRANSACTIONAL
    if e.get("event") in topics.SUPPORT_EVENTS:
        return topics.SUPPORT
    return topics.BEHAVIORAL


def run_batches(events: list[dict[str, Any]], cuts: list[int]) -> list:
    pipeline = Pipeline(":memory:", quality=False)
    outputs: list = []
    offsets = itertools.count()
    start = 0
    for cut in [*cuts, len(events)]:
        batch = [
            SourceRecord(topic_of(e), 0, next(offsets), orjson.dumps(e)) for e in events[start:cut]
        ]
        pipeline.process(batch, outputs.extend)
        start = cut
    pipeline.close()
    return outputs


def replica(outputs: list) -> ProfileStore:
    store = ProfileStore(":memory:")
    store.apply(
        [ConsumedRecord(o.topic, 0, n, o.key, o.value, o.headers) for n, o in enumerate(outputs)]
    )
    return store


def profiles_by_identifiers(outputs: list, purpose: str, now: datetime) -> dict:
    """Each person's computed traits as read for `purpose` at `now`, keyed by their identifiers."""
    store = replica(outputs)
    try:
        persons = [
            r[0] for r in store.conn.execute("SELECT person_id FROM profile_documents").fetchall()
        ]
        out = {}
        for person in persons:
            doc = store.get(person)
            ids = frozenset(v for values in doc["identifiers"].values() for v in values)
            view = store.get(person, purpose, now)
            out[ids] = view["computed"] if view else None
        return out
    finally:
        store.close()


def test_the_packaged_traits_load_and_bad_ones_are_named():
    catalog = load_traits(known_kinds={"page", "screen", "track", "order_completed"} | _KINDS)
    assert {"order_count", "page_views_7d", "lifetime_value", "days_since_last_seen"} <= (
        catalog.names
    )


_KINDS = {"order_refunded", "ticket_opened", "ticket_closed", "csat_submitted", "identify"}


def test_an_invalid_traits_file_lists_every_problem(tmp_path):
    path = tmp_path / "traits.yaml"
    path.write_text(
        """
computed:
  a: {op: average, kinds: [page]}
  b: {op: count, kinds: [pagee], window_days: 0}
  c: {op: sum, kinds: [order_completed], field: total}
  d: {op: days_since, of: a}
identify_traits: {default: newest}
"""
    )
    with pytest.raises(TraitConfigError) as raised:
        load_traits(path, known_kinds={"page", "order_completed"})
    message = str(raised.value)
    for expected in (
        "a: op must be one of",
        "b: unknown event kind 'pagee'",
        "b: window_days must be a positive integer",
        "c: op sum needs `group_by`",
        "d: `of` must name a first_time or last_time trait",
        "identify_traits.default",
    ):
        assert expected in message


def test_windowed_traits_that_differ_only_in_their_window_are_twins(tmp_path):
    path = tmp_path / "traits.yaml"
    path.write_text(
        """
computed:
  views_30d: {op: count, kinds: [page], window_days: 30}
  views_7d: {op: count, kinds: [page], window_days: 7}
  orders_7d: {op: count, kinds: [order_completed], window_days: 7}
  sessions_7d: {op: distinct_count, kinds: [page], field: session, window_days: 7}
  sessions_1d: {op: distinct_count, kinds: [page], field: session, window_days: 1}
  carts_7d: {op: distinct_count, kinds: [page], field: cart_id, window_days: 7}
  views: {op: count, kinds: [page]}
"""
    )
    catalog = load_traits(path, known_kinds={"page", "order_completed"})
    # The first by name of each set stands for the others; other kinds or fields do not.
    assert catalog.window_twins == {"views_7d": "views_30d", "sessions_7d": "sessions_1d"}


def test_traits_that_add_the_same_rows_are_one_family(tmp_path):
    path = tmp_path / "traits.yaml"
    path.write_text(
        """
computed:
  events: {op: count, kinds: ["*"]}
  seen_at: {op: last_time, kinds: ["*", page]}
  pages: {op: count, kinds: [page]}
  first_page: {op: first_time, kinds: [page]}
  views_7d: {op: count, kinds: [page], window_days: 7}
  views_30d: {op: count, kinds: [page], window_days: 30}
  spent: {op: sum, kinds: [order_completed], subtract_kinds: [order_refunded], field: total,
          group_by: currency, distinct_by: order_id}
  bought: {op: sum, kinds: [order_completed], field: total, group_by: currency,
           distinct_by: order_id}
  basket: {op: mean, kinds: [order_completed], field: total, group_by: currency,
           distinct_by: order_id}
  average: {op: mean, kinds: [order_completed], field: total, group_by: currency}
  cats: {op: top, kinds: [page], field: category}
  cat_count: {op: distinct_count, kinds: [page], field: category}
  cats_7d: {op: distinct_count, kinds: [page], field: category, window_days: 7}
  name: {op: latest, kinds: [page], field: name}
  name_anywhere: {op: latest, kinds: ["*"], field: name}
"""
    )
    catalog = load_traits(path, known_kinds={"page", "order_completed", "order_refunded"})
    # `_seen` first, then sums (a mean's rows are a sum's additions), then by name; a
    # windowed count, another subtraction or amount (no distinct_by), another kind set:
    # families apart.
    assert catalog.row_families == (
        ("_seen", "events", "seen_at"),
        ("bought", "basket"),
        ("cat_count", "cats"),
        ("first_page", "pages"),
        ("views_30d", "views_7d"),
    )


def test_merge_strategies_for_identify_traits():
    t = [START + timedelta(minutes=m) for m in range(3)]
    values = [(t[1], "b", 5), (t[0], "a", 9), (t[2], "c", 2)]
    assert merge_identify_trait("latest", values) == 2
    assert merge_identify_trait("first", values) == 9
    assert merge_identify_trait("max", values) == 9
    assert merge_identify_trait("sum", values) == 16
    assert merge_identify_trait("union", [(t[0], "a", ["x", "y"]), (t[1], "b", "y")]) == ["x", "y"]
    # Values already in (ts, event key) order, as the profile rebuild reads them, merge the
    # same without being sorted again.
    in_order = [*sorted(values, key=lambda v: (v[0], v[1])), (t[2], "d", "z"), (t[2], "e", "y")]
    for strategy in ("latest", "first", "max", "sum", "union"):
        expected = merge_identify_trait(strategy, list(reversed(in_order)))
        assert merge_identify_trait(strategy, in_order, ordered=True) == expected


def test_windowed_traits_decay_with_the_read_clock_not_the_event_clock():
    events = [event("page", m * 60 * 24, anonymousId="dev-1") for m in (0, 0, 3, 10)]
    outputs = run_batches(events, [2])
    store = replica(outputs)
    try:
        (person,) = [
            r[0] for r in store.conn.execute("SELECT person_id FROM profile_documents").fetchall()
        ]
        day = START.date()

        def read(days_after_start: int) -> dict[str, Any]:
            now = datetime(day.year, day.month, day.day, 23, tzinfo=UTC) + timedelta(
                days=days_after_start
            )
            return store.get(person, "analytics", now)["computed"]

        # Events on days 0, 0, 3 and 10 (event time). Reads move through time.
        assert (read(10)["page_views_7d"], read(10)["page_views_30d"]) == (1, 4)
        assert read(13)["page_views_7d"] == 1  # days 7..13 hold day 10 only
        assert read(17)["page_views_7d"] == 0  # day 10 left the 7-day window
        assert read(29)["page_views_30d"] == 4
        assert read(30)["page_views_30d"] == 2  # day 0 left the 30-day window
        assert read(40)["page_views_30d"] == 0
        assert read(40)["days_since_last_seen"] == 30
        assert read(10)["sessions_30d"] == 3  # the two day-0 views share a 30-minute slot
    finally:
        store.close()


# A random history of two users, four devices (d4 never identifies), orders with repeats
# and refunds, and analytics consent changes, cut into random batches. The oracle counts
# from the history itself; the single-batch run must agree with every cut.
DEVICE_USER = {"d1": "u1", "d2": "u1", "d3": "u2", "d4": None}
_op = st.one_of(
    st.tuples(st.just("page"), st.sampled_from(sorted(DEVICE_USER)), st.integers(0, 40)),
    st.tuples(st.just("identify"), st.sampled_from(["d1", "d2", "d3"])),
    st.tuples(st.just("order"), st.sampled_from(["u1", "u2"]), st.integers(1, 3)),
    st.tuples(st.just("refund"), st.sampled_from(["u1", "u2"]), st.integers(1, 3)),
    st.tuples(st.just("consent"), st.sampled_from(["granted", "withdrawn"])),
)


def _history(ops: list[tuple]) -> list[dict[str, Any]]:
    events = []
    for n, op in enumerate(ops):
        if op[0] == "page":
            events.append(event("page", op[2] * 60 * 24 + n, anonymousId=op[1]))
        elif op[0] == "identify":
            events.append(event("identify", n, anonymousId=op[1], userId=DEVICE_USER[op[1]]))
        elif op[0] in ("order", "refund"):
            name = "Order Completed" if op[0] == "order" else "Order Refunded"
            total = 10 * op[2] + 0.25 if op[0] == "order" else 1.5
            props = {"order_id": f"{op[1]}-o{op[2]}", "total": total, "currency": "USD"}
            events.append(event(name, n, userId=op[1], properties=props))
        else:
            events.append(
                event(
                    "consent",
                    n,
                    userId="u1",
                    consent={"purpose": "analytics", "status": op[1], "source": "cmp"},
                )
            )
    return events


def _oracle(ops: list[tuple], now: datetime) -> dict[frozenset, dict[str, Any]]:
    identified = {op[1] for op in ops if op[0] == "identify"}
    owner = {d: (u if d in identified else d) for d, u in DEVICE_USER.items()}
    statements = [(n, op[1]) for n, op in enumerate(ops) if op[0] == "consent"]
    analytics_u1 = statements[-1][1] == "granted" if statements else True  # US: opt-out
    clusters: dict[str, dict[str, Any]] = {}

    def cluster(owner_id: str) -> dict[str, Any]:
        return clusters.setdefault(
            owner_id, {"ids": {owner_id}, "pages": [], "orders": {}, "refunds": 0, "events": 0}
        )

    for n, op in enumerate(ops):
        if op[0] == "page":
            c = cluster(owner[op[1]])
            c["ids"].add(op[1])
            c["pages"].append(START + timedelta(days=op[2], minutes=n))
            c["events"] += 1
        elif op[0] == "identify":
            c = cluster(DEVICE_USER[op[1]])
            c["ids"].add(op[1])
            c["events"] += 1
        elif op[0] == "order":
            c = cluster(op[1])
            c["orders"][op[2]] = Decimal(10 * op[2]) + Decimal("0.25")
            c["events"] += 1
        elif op[0] == "refund":
            c = cluster(op[1])
            c["refunds"] += 1
            c["events"] += 1
    expected = {}
    week = now.date() - timedelta(days=6)
    for owner_id, c in clusters.items():
        allowed = analytics_u1 if owner_id == "u1" else True
        ltv = sum(c["orders"].values(), Decimal(0)) - Decimal("1.5") * c["refunds"]
        expected[frozenset(c["ids"])] = {
            "event_count": c["events"],
            "order_count": len(c["orders"]),
            "lifetime_value": {"USD": float(ltv)} if c["orders"] or c["refunds"] else {},
            "page_views_7d": sum(1 for p in c["pages"] if p.date() >= week) if allowed else 0,
            "personalized_events": c["events"] - (0 if allowed else len(c["pages"])),
        }
    return expected


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, min_size=1, max_size=16), data=st.data())
def test_incremental_traits_equal_the_aggregate_of_consented_facts(ops, data):
    events = _history(ops)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(events) - 1 or 1), max_size=5)))
    now = START + timedelta(days=41)
    expected = _oracle(ops, now)
    got_all = profiles_by_identifiers(run_batches(events, cuts), "subject_access", now)
    got_personal = profiles_by_identifiers(run_batches(events, cuts), "personalization", now)
    one_batch = profiles_by_identifiers(run_batches(events, []), "subject_access", now)
    assert got_all == one_batch
    assert set(got_all) == set(expected)
    for ids, want in expected.items():
        computed = got_all[ids]
        assert computed["event_count"] == want["event_count"], ids
        assert computed["order_count"] == want["order_count"], ids
        assert computed["lifetime_value"] == want["lifetime_value"], ids
        personal = got_personal[ids] or {"event_count": 0, "page_views_7d": 0}
        assert personal["event_count"] == want["personalized_events"], ids
        assert personal["page_views_7d"] == want["page_views_7d"], ids


def _trait_state(events: list[dict[str, Any]], cuts: list[int], fold_every: int = 0) -> list[tuple]:
    """The accumulator rows after `events` in batches cut at `cuts`, folded after every
    `fold_every`-th batch (0: only at the end)."""
    pipeline = Pipeline(":memory:", quality=False)
    offsets = itertools.count()
    start = 0
    for number, cut in enumerate([*cuts, len(events)], 1):
        batch = [
            SourceRecord(topic_of(e), 0, next(offsets), orjson.dumps(e)) for e in events[start:cut]
        ]
        pipeline.process(batch, lambda _outputs: None)
        if fold_every and number % fold_every == 0:
            pipeline.builder.fold()
        start = cut
    pipeline.builder.fold()
    assert pipeline.conn.execute("SELECT count(*) FROM trait_deltas").fetchone() == (0,)
    # Person ids aside: which event founds a person depends on how the events were batched.
    rows = pipeline.conn.execute(
        "SELECT * EXCLUDE (person_id) FROM trait_state ORDER BY ALL"
    ).fetchall()
    pipeline.close()
    return rows


def test_a_batch_adds_to_the_accumulators_as_its_events_one_batch_each_would():
    who = {"userId": "u-acc", "context": US}
    events = [
        event(
            "CSAT Submitted", 30, properties={"ticket_id": "T1", "score": 3}, messageId="a1", **who
        ),
        event(
            "CSAT Submitted", 10, properties={"ticket_id": "T1", "score": 5}, messageId="a2", **who
        ),
        # Same time as the first: the larger event key is the latest.
        event(
            "CSAT Submitted", 30, properties={"ticket_id": "T2", "score": 4}, messageId="a3", **who
        ),
        event("page", 20, **who),
        event("page", 5, **who),
        event(
            "Order Completed",
            40,
            properties={"order_id": "O1", "total": 12.5, "currency": "USD"},
            **who,
        ),
        event(
            "Order Completed",
            15,
            properties={"order_id": "O1", "total": 12.5, "currency": "USD"},
            **who,
        ),
    ]
    together = _trait_state(events, [])
    one_by_one = _trait_state(events, list(range(1, len(events))))
    assert together == one_by_one
    # Folded every third batch: keys with rows both folded and appended, several appended.
    assert _trait_state(events, list(range(1, len(events))), fold_every=3) == together
    by_trait = {row[3]: row[5:] for row in together if row[4] in ("", "+|USD|O1")}
    n, amount, first_ts, last_ts, value, last_key = by_trait["last_csat"]
    assert (n, amount, last_key, orjson.loads(value)) == (3, 0, "a3", 4)
    assert (first_ts, last_ts) == (START + timedelta(minutes=10), START + timedelta(minutes=30))
    assert by_trait["lifetime_value"][:2] == (2, Decimal("25.00"))
    # One row per ingestion purpose: pages, orders and surveys are ingested for different ones.
    # The counts, first and last times of every event are `_seen`'s rows, written once.
    assert sum(row[5] for row in together if row[3] == "_seen") == 7
    assert min(row[7] for row in together if row[3] == "_seen") == START + timedelta(minutes=5)
    assert max(row[8] for row in together if row[3] == "_seen") == START + timedelta(minutes=40)
    assert not {"event_count", "first_seen", "last_seen"} & {row[3] for row in together}
