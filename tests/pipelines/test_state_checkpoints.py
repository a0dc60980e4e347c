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
