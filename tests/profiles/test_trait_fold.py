"""Appended accumulator rows and folded ones add up to the same profiles.

Each batch appends its sums per key to `trait_deltas`; a fold merges them into
`trait_state`. Where the fold happens must not show: a stream with merges, returning
persons and windows gives the same published records and the same summed rows folded
after every batch as never folded.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pipelines.pipeline import OutRecord, Pipeline, SourceRecord
from pipelines.topics import route
from profiles import builder
from synthetic.events import generate

END = datetime(2026, 11, 1, tzinfo=UTC)
SUMMED = """SELECT record_id, purpose, jurisdiction, trait, bucket, sum(n)::BIGINT,
                   sum(amount), min(first_ts), max(last_ts),
                   arg_max(value, (last_ts, last_key)), max((last_ts, last_key))
            FROM trait_rows GROUP BY ALL ORDER BY ALL"""


def _timeless(record: OutRecord) -> tuple:
    """A record's headers but the wall-clock times it was stamped with (`..._at`)."""
    return tuple((name, value) for name, value in record.headers if not name.endswith("_at"))


def _run(lines: list[bytes]) -> tuple[list[OutRecord], list[tuple], int]:
    """Published records, summed accumulator rows and appended rows left, 250 per batch."""
    pipeline = Pipeline(":memory:", quality=False)
    out: list[OutRecord] = []
    records = [SourceRecord(route(raw)[0], 0, n, raw) for n, raw in enumerate(lines)]
    for start in range(0, len(records), 250):
        pipeline.process(records[start : start + 250], out.extend)
    summed = pipeline.conn.execute(SUMMED).fetchall()
    ((appended,),) = pipeline.conn.execute("SELECT count(*) FROM trait_deltas").fetchall()
    pipeline.close()
    return out, summed, appended


@pytest.mark.parametrize("slices", [1, 3])
def test_folding_after_every_batch_publishes_what_never_folding_does(monkeypatch, slices):
    lines = [raw for raw, _ in generate(persons=60, events=2000, seed=5, end=END)]
    lines += [raw for raw, _ in generate(persons=60, events=1000, seed=5, end=END)][::2]
    monkeypatch.setattr(builder, "FOLD_MIN_ROWS", 10**9)
    never, never_rows, appended = _run(lines)
    monkeypatch.setattr(builder, "FOLD_MIN_ROWS", 0)
    monkeypatch.setattr(builder, "FOLD_SHARE", 0.0)
    monkeypatch.setattr(builder, "FOLD_SLICES", slices)  # every batch folds one slice
    always, always_rows, left = _run(lines)
    assert (left == 0) == (slices == 1)  # sliced: the other slices' last rows are left
    assert appended > len(never_rows)  # some key was added to by more than one batch
    assert len(always) == len(never) > 0
    assert always_rows == never_rows
    for a, b in zip(always, never, strict=True):
        assert (a.topic, a.key, a.value, _timeless(a)) == (b.topic, b.key, b.value, _timeless(b))


def test_a_due_fold_folds_one_slice_per_batch_from_the_batch_it_is_due(monkeypatch):
    share, slices = 0.5, 3
    monkeypatch.setattr(builder, "FOLD_MIN_ROWS", 1)
    monkeypatch.setattr(builder, "FOLD_SHARE", share)
    monkeypatch.setattr(builder, "FOLD_SLICES", slices)
    pipeline = Pipeline(":memory:", quality=False)
    lines = [raw for raw, _ in generate(persons=30, events=1200, seed=3, end=END)]
    records = [SourceRecord(route(raw)[0], 0, n, raw) for n, raw in enumerate(lines)]
    per_slice = f"SELECT count(*) FROM trait_deltas WHERE hash(record_id) % {slices} = ?"
    folded_slices: list[int | None] = []  # per batch: the slice it folded, if any
    for start in range(0, len(records), 50):
        before = [pipeline.conn.execute(per_slice, [s]).fetchone()[0] for s in range(slices)]
        pipeline.process(records[start : start + 50], lambda _out: None)
        after = [pipeline.conn.execute(per_slice, [s]).fetchone()[0] for s in range(slices)]
        # Rows leave the deltas only by a fold, which empties its slice after the batch's
        # append (every batch here appends to every slice).
        emptied = [s for s in range(slices) if after[s] == 0]
        assert all(after[s] >= before[s] for s in range(slices) if s not in emptied)
        assert len(emptied) <= 1
        folded_slices.append(emptied[0] if emptied else None)
        ((folded,),) = pipeline.conn.execute("SELECT count(*) FROM trait_state").fetchall()
        if not emptied:  # no fold under way, and none due
            assert sum(after) < max(1, share * folded)
    pipeline.close()
    starts = [n for n, s in enumerate(folded_slices) if s == 0]
    assert len(starts) >= 2
    for start in starts:  # each fold goes through the slices in order, a batch each
        expected = list(range(slices))[: len(folded_slices) - start]
        assert folded_slices[start : start + slices] == expected
    assert all(
        s is None or s == 0 or folded_slices[n - 1] == s - 1 for n, s in enumerate(folded_slices)
    )
