"""The state file's checkpoint policy: WAL up to `CHECKPOINT_WAL`, then folded into the file."""

from __future__ import annotations

import duckdb

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


def _blocks(conn, table: str, row_group: int) -> list[tuple[int, int]]:
    """Where each segment of a stored row group lies in the file."""
    return conn.execute(
        f"""SELECT block_id, block_offset FROM pragma_storage_info('{table}')
            WHERE row_group_id = {row_group} ORDER BY column_id, segment_id"""
    ).fetchall()


def test_a_merge_appends_the_moved_facts_and_leaves_stored_row_groups_as_they_were(run, make_event):
    guest = {"email": "kim@x.com"}
    at = "2026-09-0{}T10:00:00Z".format
    run.feed(
        make_event("identify", anonymousId="guest", traits=guest, timestamp=at(1)),
        make_event("page", anonymousId="guest", timestamp=at(1)),
    )
    run.feed(make_event("identify", userId="kim", traits={"plan": "pro"}, timestamp=at(2)))
    conn = run.pipeline.conn
    # Left to itself DuckDB would also merge these small row groups at a checkpoint.
    conn.execute("SET max_vacuum_tasks = 0")
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
