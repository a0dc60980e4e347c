"""A crash between a batch's outputs and its commit: the batch replays exactly as it was cut."""

from pathlib import Path

import orjson
import pytest

from pipelines import topics
from pipelines.pipeline import OutRecord, Pipeline, SourceRecord
from pipelines.replay import ReplayCut, Unit

US = {"location": {"country": "US"}}


class Crash(Exception):
    """The process dying after the broker acknowledged the outputs, before the commit."""


def record(partition: int, offset: int, event: dict) -> SourceRecord:
    return SourceRecord(topics.BEHAVIORAL, partition, offset, orjson.dumps(event))


def units(*records: SourceRecord) -> list[Unit]:
    return [Unit(r, (r,)) for r in records]


def changelog_persons(outputs: list[OutRecord]) -> set[str]:
    """Persons the compacted changelog still holds: the last record per key is a profile."""
    latest: dict[str, bytes | None] = {}
    for out in outputs:
        if out.topic == topics.PROFILES_CHANGELOG:
            latest[out.key.decode()] = out.value
    return {person for person, value in latest.items() if value is not None}


def stored_persons(pipeline: Pipeline) -> set[str]:
    rows = pipeline.conn.execute("SELECT person_id FROM id_persons").fetchall()
    return {person for (person,) in rows}


@pytest.fixture
def interrupted(tmp_path: Path, make_event):
    """One person seen on two partitions; the first batch held only partition 1's event
    and died after emitting. Out: (state path, what the broker holds, the two records)."""
    path = tmp_path / "state.duckdb"
    seen_first = record(1, 0, make_event("identify", userId="u1", context=US))
    seen_later = record(0, 0, make_event("page", userId="u1", context=US))
    broker: list[OutRecord] = []

    def emit_then_die(outputs: list[OutRecord]) -> None:
        broker.extend(outputs)
        raise Crash

    pipeline = Pipeline(path)
    with pytest.raises(Crash):
        pipeline.process([seen_first], emit_then_die)
    pipeline.close()
    return path, broker, seen_first, seen_later


def test_the_journal_names_the_interrupted_batch_and_forgets_a_committed_one(interrupted):
    path, _broker, _first, seen_later = interrupted
    pipeline = Pipeline(path)
    try:
        assert pipeline.interrupted_extent() == {(topics.BEHAVIORAL, 1): (0, 0)}
        pipeline.process([seen_later], lambda _outputs: None)
        assert pipeline.interrupted_extent() == {}
    finally:
        pipeline.close()


def test_the_replay_cut_as_interrupted_leaves_no_orphan_on_the_changelog(interrupted):
    path, broker, seen_first, seen_later = interrupted
    published = changelog_persons(broker)
    pipeline = Pipeline(path)
    try:
        # The consumer redelivers both partitions interleaved, in one fetch.
        runs = ReplayCut(pipeline.interrupted_extent()).cut(units(seen_later, seen_first))
        assert [[u.position for u in run] for run in runs] == [[seen_first], [seen_later]]
        for run in runs:
            pipeline.process([u.position for u in run], broker.extend)
        assert changelog_persons(broker) == stored_persons(pipeline) == published
    finally:
        pipeline.close()


def test_a_replay_cut_otherwise_would_leave_the_interrupted_person_behind(interrupted):
    """Why the cut matters: the same events in one batch mint the person from the other
    record, and the profile the interrupted attempt published is never retracted."""
    path, broker, seen_first, seen_later = interrupted
    published = changelog_persons(broker)
    pipeline = Pipeline(path)
    try:
        pipeline.process([seen_later, seen_first], broker.extend)
        orphans = changelog_persons(broker) - stored_persons(pipeline)
        assert orphans and orphans == published
    finally:
        pipeline.close()


def test_the_cut_holds_back_until_the_extent_is_whole_then_passes_everything():
    a = [record(0, offset, {}) for offset in range(4)]
    b = [record(1, offset, {}) for offset in range(3)]
    cut = ReplayCut({(topics.BEHAVIORAL, 0): (1, 2), (topics.BEHAVIORAL, 1): (0, 1)})
    assert cut.cut(units(a[1], b[0], a[2], a[3])) == [] and cut.waiting
    runs = cut.cut(units(b[1], b[2]))
    assert [[u.position for u in run] for run in runs] == [[a[1], b[0], a[2], b[1]], [a[3], b[2]]]
    assert not cut.waiting
    assert cut.cut(units(a[0])) == [units(a[0])]
    assert cut.cut([]) == []


def test_an_extent_that_cannot_come_back_is_released_after_the_patience(caplog):
    a = [record(0, offset, {}) for offset in range(3)]
    cut = ReplayCut({(topics.BEHAVIORAL, 0): (0, 5)}, patience=0)
    assert cut.cut(units(*a)) == [units(*a)]
    assert "did not come back whole" in caplog.text
