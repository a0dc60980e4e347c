"""Segments: YAML conditions over a purpose view, entries and exits as events, members pages."""

from __future__ import annotations

import orjson
import pytest

from consent.policy import load_policy
from pipelines import topics
from profiles.segments import SegmentConfigError, load_segments
from profiles.store import ConsumedRecord, ProfileStore
from profiles.traits import load_traits

CATALOG = load_traits()
PURPOSES = set(load_policy().purposes)
US = {"location": {"country": "US"}}


def changes(run) -> list[dict]:
    return [orjson.loads(o.value) for o in run.on(topics.SEGMENT_CHANGES)]


def order(make_event, user: str | None, order_id: str, total: float, **fields):
    who = {"userId": user} if user else {}
    return make_event(
        "track",
        event="Order Completed",
        properties={"order_id": order_id, "total": total, "currency": "EUR"},
        context=US,
        **who,
        **fields,
    )


def test_the_packaged_segments_load():
    segments = load_segments(CATALOG, PURPOSES)
    assert segments["repeat_buyers"].purpose == "marketing"


def test_an_invalid_segments_file_lists_every_problem(tmp_path):
    path = tmp_path / "segments.yaml"
    path.write_text(
        """
segments:
  a: {purpose: astrology, condition: {trait: order_count, op: ">=", value: 1}}
  b: {purpose: marketing, condition: {trait: shoe_size, op: ">", value: 1}}
  c: {purpose: marketing, condition: {all: []}}
  d: {purpose: marketing, condition: {trait: order_count, op: "~", value: 1}}
  e: {purpose: marketing, condition: {trait: traits.plan, op: "in", value: pro}}
"""
    )
    with pytest.raises(SegmentConfigError) as raised:
        load_segments(CATALOG, PURPOSES, path)
    message = str(raised.value)
    for expected in (
        "a: purpose must be one of",
        "b.condition: unknown trait 'shoe_size'",
        "c.condition.all: must be a non-empty list",
        "d.condition: op must be one of",
        "e.condition: op in needs a list",
    ):
        assert expected in message


def test_entries_and_exits_follow_profile_changes_consent_and_merges(run, make_event):
    run.feed(order(make_event, "u-1", "o1", 20.0))
    assert changes(run) == []  # one order: not a repeat buyer yet
    run.feed(order(make_event, "u-1", "o1", 20.0))
    assert changes(run) == []  # the same order again counts once
    run.feed(order(make_event, "u-1", "o2", 300.0))
    entered = {(c["segment"], c["change"]) for c in changes(run)}
    assert entered == {("repeat_buyers", "entered"), ("high_value_eur", "entered")}
    (person,) = {c["person_id"] for c in changes(run)}
    # Withdrawing marketing consent removes the marketing view: both segments are exited.
    run.feed(
        make_event(
            "consent",
            userId="u-1",
            consent={"purpose": "marketing", "status": "withdrawn", "source": "cmp"},
        ),
        topic=topics.CONSENT,
    )
    latest = changes(run)[-2:]
    assert {(c["segment"], c["change"], c["person_id"]) for c in latest} == {
        ("repeat_buyers", "exited", person),
        ("high_value_eur", "exited", person),
    }
    store = ProfileStore(":memory:")
    store.apply(
        [
            ConsumedRecord(o.topic, 0, n, o.key, o.value, o.headers)
            for n, o in enumerate(run.outputs)
        ]
    )
    assert store.members("repeat_buyers") == ([], 0, None)
    store.close()


def test_a_merged_away_person_exits_and_the_survivor_is_evaluated(run, make_event):
    # u-2 is the older person (earlier event time), so its id survives the merge.
    run.feed(
        order(make_event, "u-2", "o1", 10.0, anonymousId="dev-9", timestamp="2026-09-01T08:00:00Z")
    )
    run.feed(
        order(make_event, None, "o2", 10.0, anonymousId="dev-8"),
        order(make_event, None, "o3", 10.0, anonymousId="dev-8"),
    )
    (loser,) = {c["person_id"] for c in changes(run) if c["change"] == "entered"}
    run.feed(make_event("identify", userId="u-2", anonymousId="dev-8", context=US))
    after = [c for c in changes(run) if c["segment"] == "repeat_buyers"]
    survivor = run.latest_documents()
    (kept,) = survivor
    assert kept != loser
    assert after[-2:] == [
        {**after[-2], "person_id": kept, "change": "entered"},
        {**after[-1], "person_id": loser, "change": "exited"},
    ] or after[-2:] == [
        {**after[-2], "person_id": loser, "change": "exited"},
        {**after[-1], "person_id": kept, "change": "entered"},
    ]
    assert survivor[kept]["views"]["marketing"]["computed"]["order_count"] == 3


def test_conditions_hold_as_declared_for_every_operator_and_combinator():
    from profiles.segments import Segment

    traits = {"plan": "pro", "tags": ["a", "b"], "age": 41, "nick": None}
    computed = {"order_count": 3, "lifetime_value": {"EUR": 300.0}, "last_csat": "n/a"}
    cases = [
        ({"trait": "order_count", "op": ">=", "value": 3}, True),
        ({"trait": "order_count", "op": ">", "value": 3}, False),
        ({"trait": "order_count", "op": "<", "value": 4}, True),
        ({"trait": "order_count", "op": "<=", "value": 2}, False),
        ({"trait": "order_count", "op": "==", "value": 3}, True),
        ({"trait": "order_count", "op": "!=", "value": 3}, False),
        ({"trait": "lifetime_value.EUR", "op": ">", "value": 250}, True),
        ({"trait": "lifetime_value.USD", "op": "exists", "value": False}, True),
        ({"trait": "lifetime_value.USD", "op": ">", "value": 0}, False),
        ({"trait": "last_csat", "op": "<=", "value": 2}, False),  # a string vs a number
        ({"trait": "traits.plan", "op": "in", "value": ["pro", "team"]}, True),
        ({"trait": "traits.tags", "op": "contains", "value": "b"}, True),
        ({"trait": "traits.nick", "op": "exists", "value": True}, False),
        ({"trait": "traits.missing", "op": "!=", "value": 1}, False),  # absent is no match
        ({"all": [{"trait": "traits.age", "op": ">", "value": 40}]}, True),
        (
            {
                "any": [
                    {"trait": "order_count", "op": ">", "value": 9},
                    {"not": {"trait": "traits.plan", "op": "==", "value": "free"}},
                ]
            },
            True,
        ),
        (
            {
                "all": [
                    {"trait": "order_count", "op": ">", "value": 1},
                    {"not": {"trait": "lifetime_value.EUR", "op": ">", "value": 100}},
                ]
            },
            False,
        ),
    ]
    for condition, expected in cases:
        segment = Segment("s", "marketing", "", condition)
        assert segment.matches(traits, computed) is expected, condition
    assert Segment("s", "marketing", "", cases[-2][0]).reads() == (
        frozenset({"plan"}),
        frozenset({"order_count"}),
    )


def test_a_view_read_for_named_traits_gives_what_a_whole_read_gives_for_them():
    from datetime import UTC, datetime

    from profiles.segments import view_reads

    now = datetime(2026, 11, 20, 12, tzinfo=UTC)
    view = {
        "traits": {"plan": {"value": "pro"}, "city": {"value": "Lyon"}},
        "computed": {"order_count": 2, "last_seen": "2026-11-01T10:00:00+00:00"},
        "windows": {"page_views_7d": {"2026-11-19": 3, "2026-11-10": 4}},
    }
    whole = view_reads(view, CATALOG, now)
    named = view_reads(
        view,
        CATALOG,
        now,
        (frozenset({"plan"}), frozenset({"page_views_7d", "days_since_last_seen"})),
    )
    assert named == (
        {"plan": "pro"},
        {"page_views_7d": 3, "days_since_last_seen": 19},
    )
    assert all(whole[1][name] == value for name, value in named[1].items())
