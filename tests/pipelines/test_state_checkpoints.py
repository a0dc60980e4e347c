"""The state file's checkpoint policy: WAL up to `CHECKPOINT_WAL`, then folded into the file."""

from __future__ import annotations

import duckdb
import pytest

from pipelines import pipeline as pipeline_module
from pipelines.pipeline import CHECKPOINT_WAL, open_state


def _wal_bytes(path) -> int:
    wal = path.with_name(path.name + ".wal")
    return wal.stat().st_size if wal.exists() else 0


def test_commits_stay_in_the_wal_until_it_passes_the_threshold_then_fold(tmp_path):
    path = tmp_path / "state.duckdb"
    conn = open_state(path)
    conn.execute("CREATE TABLE rows (id BIGINT, body VARCHAR)")
    # One small commit: durable in the WAL, not yet in the file.
    conn.execute("INSERT INTO rows SELECT i, repeat('x', 100) FROM range(1000) t(i)")
    small = _wal_bytes(path)
    assert small > 0
    # Commits of ~1 MB each until the WAL passes the threshold: a checkpoint empties it.
    limit = int(CHECKPOINT_WAL.removesuffix("MB")) * 1_000_000
    sizes = []
    for batch in range(2 * limit // 1_000_000):
        conn.execute(
            "INSERT INTO rows SELECT i, md5(i::VARCHAR) || repeat('y', 1000) FROM range(?, ?) t(i)",
            [batch * 1000, (batch + 1) * 1000],
        )
        sizes.append(_wal_bytes(path))
        if sizes[-1] < sizes[0]:
            break
    assert sizes[-1] < sizes[0] < max(sizes), "the WAL was never folded into the file"
    assert limit * 0.9 <= max(sizes) <= limit * 1.1  # folded at the threshold, not before
    # Nothing lost by the fold: a fresh process reads every committed row from the file.
    conn.close()
    reopened = duckdb.connect(str(path), read_only=True)
    assert reopened.execute("SELECT count(*) FROM rows").fetchone()[0] == 1000 + len(sizes) * 1000
    reopened.close()


def _row_groups(conn, table: str) -> list[tuple[int, int]]:
    """(row group, rows) of a table as stored (its first column's segments)."""
    return conn.execute(
        f"""SELECT row_group_id, sum(count)::BIGINT FROM pragma_storage_info('{table}')
            WHERE column_id = 0 AND segment_type <> 'VALIDITY' GROUP BY 1 ORDER BY 1"""
    ).fetchall()


def _blocks(conn, table: str, row_group: int) -> list[tuple[int, int]]:
    return conn.execute(
        f"""SELECT block_id, block_offset FROM pragma_storage_info('{table}')
            WHERE row_group_id = {row_group} ORDER BY column_id, segment_id"""
    ).fetchall()


def _append_in_checkpoints(conn, chunks: int, rows: int = 40_000) -> None:
    """Append `chunks` runs of `rows` rows, each folded into the file by a checkpoint."""
    for chunk in range(chunks):
        conn.execute(
            "INSERT INTO log SELECT i, md5(i::VARCHAR) FROM range(?, ?) t(i)",
            [chunk * rows, (chunk + 1) * rows],
        )
        conn.execute("CHECKPOINT")


def test_checkpoints_fold_appends_without_rewriting_earlier_row_groups(tmp_path):
    conn = open_state(tmp_path / "state.duckdb")
    conn.execute("CREATE TABLE log (id BIGINT, body VARCHAR)")
    _append_in_checkpoints(conn, 1)
    first = _blocks(conn, "log", 0)
    _append_in_checkpoints(conn, 3)
    # Each checkpoint's appends are a row group of their own; the first stays where it was.
    assert [rows for _, rows in _row_groups(conn, "log")] == [40_000] * 4
    assert _blocks(conn, "log", 0) == first
    assert conn.execute("SELECT count(*) FROM log").fetchall() == [(160_000,)]
    conn.close()


@pytest.mark.parametrize("due", [False, True])
def test_a_batch_past_the_compaction_events_merges_row_groups(run, monkeypatch, due):
    conn = run.pipeline.conn
    conn.execute("CREATE TABLE log (id BIGINT, body VARCHAR)")
    _append_in_checkpoints(conn, 4)
    conn.execute("INSERT INTO log VALUES (-1, 'since the last checkpoint')")
    monkeypatch.setattr(pipeline_module, "COMPACT_EVENTS", 2 if due else 1_000_000)
    event = b'{"type": "page", "messageId": "m1", "anonymousId": "a1", "timestamp": "2026-10-01T10:00:00Z"}'
    run.feed(event, event)  # two events committed: compaction is due at 2
    conn.execute("CHECKPOINT")
    groups = _row_groups(conn, "log")
    assert sum(rows for _, rows in groups) == 160_001
    # Due: three of the four runs merged into one (DuckDB leaves a short tail as it is);
    # not due: the four runs and the one row, each a row group.
    assert [rows for _, rows in groups] == (
        [120_000, 40_000, 1] if due else [40_000, 40_000, 40_000, 40_000, 1]
    )
    assert run.pipeline._uncompacted == (0 if due else 2)
    # Merging is on only for that commit and its checkpoint.
    assert conn.execute("SELECT current_setting('max_vacuum_tasks')").fetchall() == [(0,)]


def test_a_merge_appends_the_moved_facts_and_leaves_stored_row_groups_as_they_were(run, make_event):
    guest = {"email": "kim@x.com"}
    at = "2026-09-0{}T10:00:00Z".format
    run.feed(
        make_event("identify", anonymousId="guest", traits=guest, timestamp=at(1)),
        make_event("page", anonymousId="guest", timestamp=at(1)),
    )
    run.feed(make_event("identify", userId="kim", traits={"plan": "pro"}, timestamp=at(2)))
    conn = run.pipeline.conn
    conn.execute("CHECKPOINT")
    tables = ("facts", "trait_facts")
    stored = {table: _blocks(conn, table, 0) for table in tables}
    before = conn.execute("SELECT event_key, person_id FROM facts").fetchall()
    assert len({person for _, person in before}) == 2
    merge = make_event("identify", userId="kim", traits=guest, timestamp=at(3))
    assert run.feed(merge).merges == 1
    conn.execute("CHECKPOINT")
    # Every fact now names the one surviving person, none lost or doubled ...
    after = conn.execute("SELECT event_key, person_id FROM facts").fetchall()
    keys = [key for key, _ in after]
    assert len(keys) == len(set(keys)) == len(before) + 1  # the merging event's own
    assert {key for key, _ in before} < set(keys)
    assert len({person for _, person in after}) == 1
    # ... moved by deleting and appending them: what was stored was not rewritten.
    assert {table: _blocks(conn, table, 0) for table in tables} == stored
