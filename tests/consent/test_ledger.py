import hashlib
import itertools

import orjson

from consent.ledger import GENESIS_HASH, LineageLedger
from pipelines.pipeline import open_state


def test_chain_verifies_and_tampering_names_the_first_broken_entry():
    conn = open_state(":memory:")
    ledger = LineageLedger(conn)
    entries = ledger.append([{"event_key": f"e{i}", "decision": "allowed"} for i in range(1, 6)])
    assert entries[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(entries))
    assert ledger.verify().ok and ledger.verify().entries == 5

    tampered = orjson.dumps({"event_key": "e3", "decision": "withheld"}).decode()
    conn.execute("UPDATE lineage SET entry = ? WHERE seq = 3", [tampered])
    result = ledger.verify()
    assert not result.ok and result.first_broken_seq == 3
    assert "content" in result.problem


def test_deleting_an_entry_is_detected():
    conn = open_state(":memory:")
    ledger = LineageLedger(conn)
    ledger.append([{"event_key": f"e{i}"} for i in range(4)])
    conn.execute("DELETE FROM lineage WHERE seq = 2")
    result = ledger.verify()
    assert not result.ok and result.first_broken_seq == 3


def test_appends_continue_the_chain_across_batches():
    ledger = LineageLedger(open_state(":memory:"))
    first = ledger.append([{"event_key": "a"}])
    second = ledger.append([{"event_key": "b"}])
    assert second[0].prev_hash == first[0].hash and second[0].seq == 2
    assert ledger.verify().ok


def test_stored_entries_are_their_exact_json_text_and_queryable_as_json():
    conn = open_state(":memory:")
    ledger = LineageLedger(conn)
    entry = {"event_key": "a", "source": {"topic": "t", "offset": 7}, "subjects": ["x", "ü"]}
    ledger.append([entry])
    text, offset, kind, prev_hash, digest = conn.execute(
        "SELECT entry, entry->>'$.source.offset', typeof(entry), prev_hash, hash FROM lineage"
    ).fetchone()
    # Stored as its canonical JSON, not re-encoded: the very text its hash covers.
    assert text == orjson.dumps(entry, option=orjson.OPT_SORT_KEYS).decode()
    assert text != orjson.dumps(entry).decode()  # written out of order, stored sorted
    assert hashlib.sha256((prev_hash + text).encode()).hexdigest() == digest
    assert offset == "7" and kind == "JSON"
    assert ledger.verify().ok


def test_appends_after_a_rolled_back_batch_chain_onto_the_committed_head():
    conn = open_state(":memory:")
    ledger = LineageLedger(conn)
    committed = ledger.append([{"event_key": f"e{i}"} for i in range(3)])
    assert ledger.append([]) == []
    conn.execute("BEGIN TRANSACTION")
    ledger.append([{"event_key": "undone1"}, {"event_key": "undone2"}])
    ledger.append([{"event_key": "undone3"}])  # its head, seq 5, is then rolled back too
    conn.execute("ROLLBACK")
    (next_entry,) = ledger.append([{"event_key": "e3"}])
    assert (next_entry.seq, next_entry.prev_hash) == (4, committed[-1].hash)
    assert ledger.verify().ok and ledger.verify().entries == 4


def test_appends_chain_onto_entries_another_ledger_appended_to_the_same_table():
    conn = open_state(":memory:")
    ledger, other = LineageLedger(conn), LineageLedger(conn)
    ledger.append([{"event_key": "a"}])  # the head this ledger remembers
    (theirs,) = other.append([{"event_key": "b"}])
    (ours,) = ledger.append([{"event_key": "c"}])
    assert (ours.seq, ours.prev_hash) == (3, theirs.hash)
    conn.execute("BEGIN TRANSACTION")
    other.append([{"event_key": "undone"}])
    conn.execute("ROLLBACK")
    (after,) = other.append([{"event_key": "d"}])  # its remembered head was rolled back
    assert (after.seq, after.prev_hash) == (4, ours.hash)
    assert ledger.verify().ok and ledger.verify().entries == 4


def test_a_ledger_stored_before_entries_were_compressed_is_rewritten_once_unchanged(tmp_path):
    path = tmp_path / "state.duckdb"
    conn = open_state(path)
    # The table as created before: no column compression named.
    conn.execute(
        "CREATE TABLE lineage (seq BIGINT PRIMARY KEY, event_key VARCHAR NOT NULL, "
        "entry JSON NOT NULL, prev_hash VARCHAR NOT NULL, hash VARCHAR NOT NULL)"
    )
    source = LineageLedger(open_state(":memory:"))
    source.append([{"event_key": f"e{i}", "n": i} for i in range(3000)])
    rows = source.conn.execute("SELECT * FROM lineage ORDER BY seq").fetchall()
    stored = source.conn.sql("SELECT * FROM lineage ORDER BY seq").to_arrow_table()  # noqa: F841
    conn.execute("INSERT INTO lineage SELECT * FROM stored")
    conn.execute("CHECKPOINT")

    ledger = LineageLedger(conn)
    (sql,) = conn.execute("SELECT sql FROM duckdb_tables() WHERE table_name = 'lineage'").fetchone()
    assert "USING COMPRESSION ZSTD" in sql.upper()
    assert conn.execute("SELECT * FROM lineage ORDER BY seq").fetchall() == rows
    assert ledger.verify().ok and ledger.verify().entries == 3000
    (appended,) = ledger.append([{"event_key": "next"}])
    assert (appended.seq, appended.prev_hash) == (3001, rows[-1][4])
    conn.execute("CHECKPOINT")
    compressions = {
        method
        for (method,) in conn.execute(
            "SELECT DISTINCT compression FROM pragma_storage_info('lineage') "
            "WHERE column_name = 'entry' AND segment_type <> 'VALIDITY'"
        ).fetchall()
    }
    assert compressions <= {"ZSTD", "Constant"} and "ZSTD" in compressions
    conn.close()
    # Opened again, it is not rewritten: the same table.
    conn = open_state(path)
    oid = "SELECT table_oid FROM duckdb_tables() WHERE table_name = 'lineage'"
    before = conn.execute(oid).fetchone()
    LineageLedger(conn)
    assert conn.execute(oid).fetchone() == before
    assert conn.execute("SELECT count(*) FROM lineage").fetchone() == (3001,)
