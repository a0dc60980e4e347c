"""The stored-key pre-filter of the dedup lookup: it must hold every stored key."""

import duckdb
import orjson
import pyarrow as pa
import pytest

from pipelines import topics
from pipelines.pipeline import Pipeline, SourceRecord
from pipelines.stored_keys import StoredKeys


def _insert(conn, stored, keys):
    _new = pa.table({"event_key": keys})
    conn.execute("INSERT INTO outcomes SELECT * FROM _new")
    stored.hold(_new)


def test_stored_keys_are_found_and_new_ones_are_not():
    conn = duckdb.connect()
    conn.execute("CREATE TABLE outcomes (event_key VARCHAR PRIMARY KEY)")
    conn.execute("INSERT INTO outcomes VALUES ('a'), ('b'), ('c')")
    stored = StoredKeys(conn, "outcomes", "event_key")
    assert stored.maybe_stored(pa.table({"event_key": ["b", "x", "c", "y", "b"]})) == [
        "b",
        "c",
        "b",
    ]
    assert [stored.holds(k) for k in ("a", "x", "c", "")] == [True, False, True, False]
    assert stored.maybe_stored(pa.table({"event_key": pa.array([], pa.string())})) == []


def test_keys_added_after_loading_are_held_before_and_after_the_fold():
    conn = duckdb.connect()
    conn.execute("CREATE TABLE outcomes (event_key VARCHAR PRIMARY KEY)")
    stored = StoredKeys(conn, "outcomes", "event_key")
    assert stored.maybe_stored(pa.table({"event_key": ["k-1"]})) == []  # loads the empty table
    for start in range(0, 80_000, 10_000):  # past the 65,536 recent hashes that fold
        _insert(conn, stored, [f"k-{i}" for i in range(start, start + 10_000)])
    probe = [f"k-{i}" for i in range(0, 80_000, 997)] + ["k-80000", "other"]
    batch = pa.table({"event_key": probe})
    assert stored.maybe_stored(batch) == probe[:-2]
    assert stored.holds("k-79999") and not stored.holds("k-80000")
    stored.forget()  # reloaded from the table: the same answer
    assert stored.maybe_stored(batch) == probe[:-2]


def test_keys_held_from_an_arrow_table_are_found_and_others_are_not():
    conn = duckdb.connect()
    conn.execute("CREATE TABLE outcomes (event_key VARCHAR)")
    stored = StoredKeys(conn, "outcomes", "event_key")
    stored.hold(pa.table({"event_key": ["early"]}))  # not loaded yet: loading reads the table
    conn.execute("INSERT INTO outcomes VALUES ('early')")
    assert stored.maybe_stored(pa.table({"event_key": ["early", "late"]})) == ["early"]
    conn.execute("INSERT INTO outcomes VALUES ('late')")
    stored.hold(pa.table({"event_key": ["late"]}))
    assert stored.maybe_stored(pa.table({"event_key": ["late", "x", "early"]})) == [
        "late",
        "early",
    ]


@pytest.mark.parametrize("index_lookups", [1_000, 2], ids=["by-key", "joined"])
def test_duplicates_are_found_in_later_batches_and_after_a_restart(
    tmp_path, make_event, monkeypatch, index_lookups
):
    # Up to INDEX_LOOKUPS stored keys are read by key; more are joined against the table.
    monkeypatch.setattr("pipelines.pipeline.INDEX_LOOKUPS", index_lookups)
    path = tmp_path / "state.duckdb"
    events = [orjson.dumps(make_event("identify", userId=f"u{i}")) for i in range(6)]
    records = [SourceRecord(topics.BEHAVIORAL, 0, i, raw) for i, raw in enumerate(events)]
    pipeline = Pipeline(path, quality=False)
    assert pipeline.process(records[:3], lambda _: None).outcomes["applied"] == 3
    assert pipeline.process(records[3:], lambda _: None).outcomes["applied"] == 3
    again = pipeline.process(records, lambda _: None)
    assert again.received == 0 and again.duplicates == 6
    pipeline.close()
    restarted = Pipeline(path, quality=False)
    again = restarted.process(records[::-1], lambda _: None)
    assert again.received == 0 and again.duplicates == 6
    # A stored messageId with other content is a distinct event, whichever way it was read.
    clash = {**orjson.loads(events[0]), "traits": {"plan": "pro"}}
    mixed = [SourceRecord(topics.BEHAVIORAL, 0, 6, orjson.dumps(clash)), records[1]]
    report = restarted.process(mixed, lambda _: None)
    assert dict(report.outcomes) == {"rejected": 1} and report.duplicates == 1
    restarted.close()
