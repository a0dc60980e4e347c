"""DuckDB's settings on the stage owner's state: its memory bound (applied, configurable,
spilling beside it) and its thread count."""

from __future__ import annotations

import duckdb
import pytest

from pipelines.pipeline import STATE_THREADS_ENV, Pipeline, open_state, state_threads
from pipelines.state_memory import (
    DEFAULT_MEMORY_LIMIT,
    MEMORY_LIMIT_ENV,
    TEMP_DIR_ENV,
    StateMemory,
)


def _setting(conn: duckdb.DuckDBPyConnection, name: str) -> str:
    return conn.execute("SELECT current_setting(?)", [name]).fetchone()[0]


def _as_duckdb_shows(limit: str) -> str:
    """A limit as DuckDB reports it once set (e.g. '2GB' -> '1.8 GiB')."""
    probe = duckdb.connect()
    probe.execute(f"SET memory_limit = '{limit}'")
    shown = _setting(probe, "memory_limit")
    probe.close()
    return shown


def test_the_state_gets_the_default_limit_and_a_temp_directory_beside_it(tmp_path, monkeypatch):
    monkeypatch.delenv(MEMORY_LIMIT_ENV, raising=False)
    monkeypatch.delenv(TEMP_DIR_ENV, raising=False)
    path = tmp_path / "state.duckdb"
    conn = open_state(path)
    # DuckDB's own default is 80% of the machine's memory: not this.
    assert _setting(conn, "memory_limit") == _as_duckdb_shows(DEFAULT_MEMORY_LIMIT)
    assert _setting(conn, "temp_directory") == f"{path.resolve()}.tmp"
    conn.close()


def test_the_worker_pipeline_reads_its_limit_and_temp_directory_from_the_environment(
    tmp_path, monkeypatch
):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "300MB")
    monkeypatch.setenv(TEMP_DIR_ENV, str(tmp_path / "spill"))
    pipeline = Pipeline(tmp_path / "state.duckdb", quality=False)
    assert _setting(pipeline.conn, "memory_limit") == _as_duckdb_shows("300MB")
    assert _setting(pipeline.conn, "temp_directory") == str(tmp_path / "spill")
    pipeline.close()


@pytest.mark.parametrize("limit", ["lots", "2", "-1GB", "80%", "1GB; DROP TABLE outcomes"])
def test_a_limit_that_is_not_a_size_is_refused_with_the_variable_named(limit):
    with pytest.raises(ValueError, match=MEMORY_LIMIT_ENV):
        StateMemory.from_env({MEMORY_LIMIT_ENV: limit})


def test_sizes_in_any_unit_are_accepted_by_the_check_and_by_duckdb():
    for limit in ("512MB", "1536 MiB", "2GiB", "1.5GB"):
        memory = StateMemory.from_env({MEMORY_LIMIT_ENV: limit})
        assert memory.memory_limit == limit
        conn = open_state(":memory:", memory)
        assert _setting(conn, "memory_limit") == _as_duckdb_shows(limit)
        conn.close()
    assert StateMemory.from_env({}).memory_limit == DEFAULT_MEMORY_LIMIT


def test_a_reader_in_the_same_process_still_opens_the_bounded_state(tmp_path):
    """Audits and tests open the state file with a plain connect beside the worker's; a
    limit given as connection config would make DuckDB refuse them."""
    path = tmp_path / "state.duckdb"
    conn = open_state(path, StateMemory("300MB"))
    conn.execute("CREATE TABLE t AS SELECT 1 AS x")
    reader = duckdb.connect(str(path))
    assert reader.execute("SELECT x FROM t").fetchall() == [(1,)]
    reader.close()
    conn.close()


def test_past_the_limit_a_query_spills_beside_the_state_and_still_answers(tmp_path):
    """A query needing more than the limit (a hash aggregate over ~70 MB of distinct
    strings under 32 MB) spills to the temporary directory beside the state file, where a
    volume mounted for the state has room, and its answer is complete."""
    path = tmp_path / "state.duckdb"
    conn = open_state(path, StateMemory("32MB"))
    conn.execute("SET enable_progress_bar = false")
    conn.execute(
        "CREATE TABLE rows AS SELECT i AS id, repeat(md5(i::VARCHAR), 7) AS body "
        "FROM range(300000) t(i)"
    )
    temp = tmp_path / "state.duckdb.tmp"
    groups = conn.execute(
        "SELECT count(*), sum(n) FROM (SELECT body, count(*) AS n FROM rows GROUP BY body)"
    ).fetchone()
    assert groups == (300_000, 300_000)
    # Without the limit nothing here would spill, and the directory would not exist.
    assert temp.is_dir() and any(temp.iterdir())
    conn.close()


def test_the_state_runs_on_one_thread_unless_the_environment_names_more(tmp_path, monkeypatch):
    monkeypatch.delenv(STATE_THREADS_ENV, raising=False)
    conn = open_state(":memory:")
    assert str(_setting(conn, "threads")) == "1"
    conn.close()
    monkeypatch.setenv(STATE_THREADS_ENV, "2")
    pipeline = Pipeline(tmp_path / "state.duckdb", quality=False)
    assert str(_setting(pipeline.conn, "threads")) == "2"
    pipeline.close()


@pytest.mark.parametrize("count", ["0", "-1", "two", "1.5", "2; DROP TABLE outcomes"])
def test_a_thread_count_that_is_not_one_or_more_is_refused_with_the_variable_named(count):
    with pytest.raises(ValueError, match=STATE_THREADS_ENV):
        state_threads({STATE_THREADS_ENV: count})
    assert state_threads({}) == 1
