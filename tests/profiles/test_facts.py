"""The profile builder's facts: an event recorded once, whether or not its caller knows it is
new, and its accumulator rows added once."""

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import duckdb
import pytest

from consent.policy import load_policy
from profiles.builder import ProfileBuilder, fact_fields

T0 = datetime(2026, 3, 1, 9, 30, tzinfo=timezone(timedelta(hours=2)))
_ROWS = """SELECT person_id, record_id, purpose, jurisdiction, trait, bucket, sum(n), sum(amount),
                  min(first_ts), max(last_ts), arg_max(value, (last_ts, last_key))
           FROM trait_rows GROUP BY ALL ORDER BY ALL"""


def _events() -> list[tuple]:
    """Applied events of two persons: pages, an order, an identify with traits, a ticket."""
    de = {"location": {"country": "DE"}, "sessionId": "s1"}
    return [
        ("e1", "p1", "page", {"type": "page", "context": de}, T0, "r1"),
        (
            "e2",
            "p1",
            "order_completed",
            {
                "type": "track",
                "context": de,
                "properties": {"order_id": "o1", "total": 19.999, "currency": "EUR"},
            },
            T0 + timedelta(minutes=1),
            "r1",
        ),
        (
            "e3",
            "p2",
            "identify",
            {"type": "identify", "traits": {"plan": "pro", "age": 41, "x" * 130: 1}},
            T0 + timedelta(minutes=2),
            "r2",
        ),
        (
            "e4",
            "p2",
            "csat_submitted",
            {"type": "track", "properties": {"ticket_id": "t1", "score": 4}},
            T0 + timedelta(minutes=3),
            "r2",
        ),
        ("e5", "p2", "page", {"type": "page", "context": {}}, T0, "r2"),
    ]


def _builder() -> ProfileBuilder:
    return ProfileBuilder(duckdb.connect(), load_policy())


def _state(builder: ProfileBuilder) -> tuple:
    q = builder.conn.execute
    return (
        q("SELECT * FROM facts ORDER BY event_key").fetchall(),
        q("SELECT * FROM trait_facts ORDER BY event_key, name").fetchall(),
        q(_ROWS).fetchall(),
    )


def test_a_fact_holds_its_events_fields_and_its_time_in_utc():
    builder = _builder()
    assert builder.add(_events(), fresh=True) == {"p1", "p2"}
    facts = {row[0]: row for row in builder.conn.execute("SELECT * FROM facts").fetchall()}
    assert facts["e2"][6] == Decimal("20.00") and facts["e2"][5] == "o1"
    assert facts["e4"][8:10] == ("t1", 4)
    assert facts["e1"][4] == T0.astimezone(UTC)
    assert fact_fields("page", {"properties": {"order_id": 7}}) == (None,) * 5
    ((cut,),) = builder.conn.execute(
        "SELECT count(*) FROM trait_facts WHERE event_key = 'e3' AND length(name) = 128"
    ).fetchall()
    assert cut == 1


def test_events_added_again_add_nothing_and_a_mix_adds_only_the_new():
    once = _builder()
    once.add(_events(), fresh=True)
    again = _builder()
    again.add(_events()[:2])
    again.add(_events())  # the first two recorded before
    again.add(_events())
    assert _state(again) == _state(once)
    assert len(_state(once)[2]) > 5


def test_a_fresh_batch_holding_a_recorded_event_fails_rather_than_count_it_twice():
    builder = _builder()
    builder.add(_events()[:1], fresh=True)
    with pytest.raises(duckdb.ConstraintException):
        builder.add(_events(), fresh=True)
