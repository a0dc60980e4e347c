"""Traits that add the same accumulator rows as another are read through its rows, not
written: the state holds each row once, and profiles are what they were.

`SEEN` holds the counts, first and last times of every event; `last_order_at` adds the
rows of `first_order_at`, `average_order_value` the additions of `lifetime_value`, and
window twins the same daily buckets. A store written before this (holding every trait's
rows) must read the same and replay idempotently; a trait whose source leaves the
catalog takes its rows over.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb

from pipelines.pipeline import Pipeline
from profiles import segments, traits
from profiles.traits import at_read

END = datetime(2026, 11, 1, 12, tzinfo=UTC)
US = {"location": {"country": "US"}}


def _batches(make_event) -> list[list[dict]]:
    """Pages, orders, refunds and tickets of four devices, two of which identify as one
    user halfway (a merge), in batches of 15, oldest first."""
    events = []
    for n in range(90):
        when = (END - timedelta(days=(n * 7) % 60, hours=n % 7)).isoformat()
        who = {"anonymousId": f"dev-{n % 4}", "timestamp": when, "context": US}
        if n % 5 == 1:
            props = {"order_id": f"o-{n % 11}", "total": 10 + n % 13, "currency": "USD"}
            props["products"] = [{"category": f"c{n % 3}"}]
            events.append(make_event("track", event="Order Completed", properties=props, **who))
        elif n % 9 == 2:
            props = {"order_id": f"o-{n % 11}", "total": 4, "currency": "USD"}
            events.append(make_event("track", event="Order Refunded", properties=props, **who))
        elif n % 7 == 3:
            events.append(
                make_event("track", event="Ticket Opened", properties={"ticket_id": f"t{n}"}, **who)
            )
        else:
            events.append(make_event("page" if n % 2 else "screen", **who))
    events.sort(key=lambda e: e["timestamp"])
    batches = [events[start : start + 15] for start in range(0, len(events), 15)]
    for device in ("dev-1", "dev-3"):  # both become one person
        batches[3].append(
            make_event(
                "identify", userId="u-1", anonymousId=device, context=US, timestamp=END.isoformat()
            )
        )
    return batches


def _views(pipeline: Pipeline) -> dict[str, dict]:
    persons = {p for (p,) in pipeline.conn.execute("SELECT person_id FROM facts").fetchall()}
    built = pipeline.builder.build(persons)
    return {
        person: {
            scope: (
                view["computed"],
                view["windows"],
                at_read(pipeline.builder.traits, view["computed"], view["windows"], END),
            )
            for scope, view in doc["views"].items()
        }
        for person, doc in built.items()
    }


def _rebuilt(run, batches, path: Path) -> dict[str, dict]:
    with type(run).of_batches(path, batches) as pipeline:  # every event, under the catalog now
        return _views(pipeline)


def _traits_held(pipeline: Pipeline) -> set[str]:
    return {t for (t,) in pipeline.conn.execute("SELECT DISTINCT trait FROM trait_rows").fetchall()}


def test_one_event_writes_each_row_once(run, make_event):
    run.feed(make_event("page", anonymousId="dev-p", context=US))
    assert _traits_held(run.pipeline) == {"_seen", "page_views_30d", "sessions_30d"}
    props = {"order_id": "o-1", "total": 12.5, "currency": "USD", "products": [{"category": "x"}]}
    run.feed(
        make_event(
            "track", event="Order Completed", anonymousId="dev-o", properties=props, context=US
        )
    )
    ((rows,),) = run.pipeline.conn.execute(
        "SELECT count(*) FROM trait_rows WHERE record_id IN "
        "(SELECT record_id FROM facts WHERE kind = 'order_completed')"
    ).fetchall()
    # `_seen`, first_order_at, lifetime_value, order_count, top_categories: five of nine.
    assert rows == 5
    built = run.pipeline.builder.build(
        {p for (p,) in run.pipeline.conn.execute("SELECT person_id FROM facts").fetchall()}
    )
    order = next(
        doc for doc in built.values() if doc["views"]["subject_access"]["computed"]["order_count"]
    )
    computed = order["views"]["subject_access"]["computed"]
    assert computed["event_count"] == 1 and computed["average_order_value"] == {"USD": 12.5}
    assert computed["first_order_at"] == computed["last_order_at"] == computed["first_seen"]


def test_a_store_written_before_reads_the_same_and_replays_idempotently(run, make_event, tmp_path):
    batches = _batches(make_event)
    for batch in batches[:3]:
        run.feed(*batch)
    run.pipeline.close()
    # What the code before held: every trait's own rows (a mean's: the sum's additions),
    # and no record of which traits are read through which.
    with duckdb.connect(str(tmp_path / "state.duckdb")) as conn:
        aliases = conn.execute("SELECT trait, source FROM trait_sources").fetchall()
        assert {"event_count", "last_order_at", "average_order_value"} <= {t for t, _ in aliases}
        for trait, source in aliases:
            conn.execute(
                """INSERT INTO trait_deltas BY NAME
                   SELECT * REPLACE (?::VARCHAR AS trait) FROM trait_rows
                   WHERE trait = ? AND NOT starts_with(bucket, '-|')""",
                [trait, source],
            )
        conn.execute("DELETE FROM trait_sources")
    run.pipeline = Pipeline(tmp_path / "state.duckdb")  # restarted by the code now
    assert "event_count" not in _traits_held(run.pipeline)
    for batch in batches[3:]:
        run.feed(*batch)
    restarted = _views(run.pipeline)
    for batch in batches:  # replayed: nothing counted twice
        run.feed(*batch)
    assert _views(run.pipeline) == restarted
    rebuilt = _rebuilt(run, batches, tmp_path / "rebuilt.duckdb")
    assert set(restarted) == set(rebuilt) and len(rebuilt) == 3
    assert sum(v["subject_access"][0]["event_count"] for v in rebuilt.values()) == 92
    assert restarted == rebuilt


def test_a_trait_whose_source_leaves_the_catalog_takes_its_rows_over(
    run, make_event, tmp_path, monkeypatch
):
    batches = _batches(make_event)
    for batch in batches[:3]:  # stored under the packaged catalog
        run.feed(*batch)
    run.pipeline.close()
    text = traits.TRAITS_PATH.read_text()
    for line in ("  first_order_at: {op: first_time, kinds: [order_completed]}\n",):
        assert line in text
        text = text.replace(line, "")
    start = text.index("  lifetime_value:\n")
    text = text[:start] + text[text.index("  average_order_value:\n") :]
    path = tmp_path / "traits.yaml"
    path.write_text(text)
    monkeypatch.setattr(traits, "TRAITS_PATH", path)
    listed = segments.SEGMENTS_PATH.read_text()  # a segment reads lifetime_value: not this one
    (tmp_path / "segments.yaml").write_text(listed[: listed.index("  high_value_eur:\n")])
    monkeypatch.setattr(segments, "SEGMENTS_PATH", tmp_path / "segments.yaml")
    run.pipeline = Pipeline(tmp_path / "state.duckdb")  # restarted without the sources
    for batch in batches[3:]:
        run.feed(*batch)
    restarted = _views(run.pipeline)
    rebuilt = _rebuilt(run, batches, tmp_path / "rebuilt.duckdb")
    some = next(iter(rebuilt.values()))["subject_access"][0]
    assert "lifetime_value" not in some and some["average_order_value"]
    assert some["last_order_at"]
    assert restarted == rebuilt
