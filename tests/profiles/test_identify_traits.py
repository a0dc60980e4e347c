"""Identify traits in a built profile merge by their strategy over the person's events:
the latest value, the first, the largest, the sum, the union; each with the time and event
key of the latest event that stated it, whatever batches the events came in.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson

from profiles.traits import merge_identify_trait

START = datetime(2026, 10, 1, 9, tzinfo=UTC)
US = {"location": {"country": "US"}}


def _identifies(make_event) -> list[dict]:
    """Identify events of one user stating traits of every strategy; two share a time
    (the larger event key is the later), and they come out of time order."""
    stated = [
        (30, {"name": "Ann", "signup_date": "2026-03-01", "loyalty_points": 40, "tags": ["a"]}),
        (10, {"name": "Anne", "signup_date": "2026-01-05", "lifetime_points": 7, "tags": "b"}),
        (50, {"name": "Ana", "loyalty_points": 12, "lifetime_points": 5, "tags": ["c", "a"]}),
        (50, {"name": "Annie", "loyalty_points": "lots", "interests": ["x"]}),
        (20, {"lifetime_points": "n/a", "signup_date": "2026-02-02", "interests": "y"}),
    ]
    return [
        make_event(
            "identify",
            userId="u-traits",
            context=US,
            timestamp=(START + timedelta(minutes=minutes)).isoformat(),
            traits=traits,
        )
        for minutes, traits in stated
    ]


def _expected(pipeline) -> dict[str, dict]:
    """Each stated trait merged from its stored facts by `merge_identify_trait` (unsorted)."""
    by_name: dict[str, list] = {}
    for name, value, ts, key in pipeline.conn.execute(
        "SELECT name, value, ts, event_key FROM trait_facts"
    ).fetchall():
        by_name.setdefault(name, []).append((ts, key, orjson.loads(value)))
    catalog = pipeline.builder.traits
    expected = {}
    for name in sorted(by_name):
        ts, key, _ = max(by_name[name], key=lambda v: (v[0], v[1]))
        expected[name] = {
            "value": merge_identify_trait(catalog.strategy(name), by_name[name]),
            "ts": ts.astimezone(UTC).isoformat(),
            "event_key": key,
        }
    return expected


def _traits(pipeline) -> dict[str, dict]:
    persons = {p for (p,) in pipeline.conn.execute("SELECT person_id FROM facts").fetchall()}
    (profile,) = pipeline.builder.build(persons).values()
    views = profile["views"]
    assert len({orjson.dumps(view["traits"]) for view in views.values()}) == 1
    return views["analytics"]["traits"]


def test_identify_traits_merge_by_strategy_in_any_batches(run, tmp_path, make_event):
    events = _identifies(make_event)
    run.feed(*events)
    together = _traits(run.pipeline)
    assert list(together) == sorted(together)  # in name order
    assert together == _expected(run.pipeline)
    values = {name: trait["value"] for name, trait in together.items()}
    assert values.pop("name") in ("Ana", "Annie")  # latest: the larger key of two at minute 50
    assert values == {
        "signup_date": "2026-01-05",  # first
        "loyalty_points": 40,  # max of the numbers
        "lifetime_points": 12,  # sum of the numbers
        "tags": ["a", "b", "c"],  # union
        "interests": ["x", "y"],
    }

    apart = type(run)(tmp_path / "apart.duckdb")
    try:
        for event in reversed(events):  # one batch each, latest first
            apart.feed(event)
        assert _traits(apart.pipeline) == together
    finally:
        apart.pipeline.close()


def test_a_store_written_before_gets_its_trait_rows_purposes_from_facts(run, tmp_path, make_event):
    """A store whose `trait_facts` lacks the events' purpose and jurisdiction (written before
    they were kept there) is given them from `facts` when opened, and builds the same."""
    path = tmp_path / "old.duckdb"
    first = type(run)(path)
    events = _identifies(make_event)
    first.feed(*events[:3])
    built = _traits(first.pipeline)
    kept = first.pipeline.conn.execute(
        "SELECT * FROM trait_facts ORDER BY event_key, name"
    ).fetchall()
    assert all(jurisdiction is not None for *_, jurisdiction in kept)
    # The table as it was before: no purpose or jurisdiction.
    first.pipeline.conn.execute(
        """CREATE TABLE old_rows AS
           SELECT * EXCLUDE (purpose, jurisdiction) FROM trait_facts;
           DROP TABLE trait_facts;
           CREATE TABLE trait_facts (
               event_key VARCHAR, person_id VARCHAR NOT NULL, record_id VARCHAR, name VARCHAR,
               value JSON, ts TIMESTAMPTZ, PRIMARY KEY (event_key, name));
           INSERT INTO trait_facts SELECT * FROM old_rows;
           DROP TABLE old_rows"""
    )
    first.pipeline.close()

    reopened = type(run)(path)
    try:
        conn = reopened.pipeline.conn
        assert conn.execute("SELECT * FROM trait_facts ORDER BY event_key, name").fetchall() == kept
        assert _traits(reopened.pipeline) == built
        reopened.feed(*events[3:])  # and goes on from there
        assert _traits(reopened.pipeline) == _expected(reopened.pipeline)
    finally:
        reopened.pipeline.close()
