"""The lineage ledger: an append-only, hash-chained record of every consent decision.

Each entry's hash covers its content and the previous entry's hash, so changing,
removing or reordering any entry breaks every hash after it; `verify` names the first.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, NamedTuple

import duckdb
import orjson
import pyarrow as pa

GENESIS_HASH = "0" * 64
# Fields a published ledger record carries besides the entry's own content.
CHAIN_FIELDS = ("seq", "prev_hash", "hash")

# The entries (~850 bytes of JSON each, most of the table's bytes) are compressed with zstd,
# not DuckDB's default dictionary/FSST: a checkpoint writing 50,000 new entries and merging
# the table's last row group cost ~0.65x the CPU, in half the space (one-off probes on the
# ledger of a store of 300,000 persons). Nothing on a batch's path reads them: the head is
# read by `seq` and `hash`.
_COLUMNS = """
    seq BIGINT PRIMARY KEY,
    event_key VARCHAR NOT NULL,
    entry JSON NOT NULL USING COMPRESSION zstd,
    prev_hash VARCHAR NOT NULL,
    hash VARCHAR NOT NULL
"""
SCHEMA_SQL = f"CREATE TABLE IF NOT EXISTS lineage ({_COLUMNS});"

# Entries are orjson's output, valid JSON by construction: typed as JSON text, DuckDB stores
# them without parsing each one again (pyarrow >= 19; older ones give plain text, parsed).
_JSON_TEXT = pa.json_(pa.string()) if hasattr(pa, "json_") else pa.string()


def canonical_json(entry: dict[str, Any]) -> bytes:
    """An entry's canonical JSON (sorted keys): what its hash covers and what is stored."""
    return orjson.dumps(entry, option=orjson.OPT_SORT_KEYS)


def _body_hash(prev_hash: str, body: bytes) -> str:
    return hashlib.sha256(prev_hash.encode() + body).hexdigest()


def entry_hash(prev_hash: str, entry: dict[str, Any]) -> str:
    """sha256 over the previous hash and the entry's canonical JSON (sorted keys)."""
    return _body_hash(prev_hash, canonical_json(entry))


class LedgerEntry(NamedTuple):
    """One chained entry: its position, content and the hashes that chain it.

    A named tuple: the ledger makes one per event, and a tuple is built in a fraction of
    a frozen dataclass's time.
    """

    seq: int
    entry: dict[str, Any]
    prev_hash: str
    hash: str

    def as_record(self) -> dict[str, Any]:
        return {**self.entry, "seq": self.seq, "prev_hash": self.prev_hash, "hash": self.hash}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> LedgerEntry:
        """The entry a published record (`as_record`, as on tessera.lineage) came from."""
        entry = {k: v for k, v in record.items() if k not in CHAIN_FIELDS}
        return cls(int(record["seq"]), entry, str(record["prev_hash"]), str(record["hash"]))


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of recomputing the chain: intact, or the first entry that breaks it."""

    ok: bool
    entries: int
    first_broken_seq: int | None = None
    problem: str | None = None
    event_key: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "first_broken_seq": self.first_broken_seq,
            "event_key": self.event_key,
            "problem": self.problem,
        }


def store_entries(
    conn: duckdb.DuckDBPyConnection,
    chained: list[LedgerEntry],
    replace: bool = False,
    texts: list[str] | None = None,
) -> None:
    """Write chained entries as they are, each entry as its canonical JSON (`texts`, when
    the caller has them already). `replace` makes a re-delivered entry a no-op (replicas
    re-reading tessera.lineage); the ledger's own appends never replace."""
    if not chained:
        return
    if texts is None:
        texts = [canonical_json(e.entry).decode() for e in chained]
    # DuckDB reads the local table by its name (a replacement scan): no register and
    # unregister around the insert (~0.4 ms an append).
    _ledger_new = pa.table(
        {
            "seq": pa.array([e.seq for e in chained], pa.int64()),
            "event_key": [e.entry.get("event_key", "") for e in chained],
            "entry": pa.array(texts, _JSON_TEXT),
            "prev_hash": [e.prev_hash for e in chained],
            "hash": [e.hash for e in chained],
        }
    )
    verb = "INSERT OR REPLACE" if replace else "INSERT"
    conn.execute(f"{verb} INTO lineage SELECT * FROM _ledger_new")


def _entry_problem(
    seq: int, expected_seq: int, event_key: str, entry: str, prev_hash: str, prev: str, digest: str
) -> str | None:
    """What is wrong with one stored entry given the chain so far, or None."""
    if seq != expected_seq:
        what = "missing" if seq > expected_seq else "duplicated"
        return f"expected seq {expected_seq}, found {seq} (entries {what})"
    if prev_hash != prev:
        return "prev_hash does not match the previous entry's hash"
    try:
        content = orjson.loads(entry)
    except orjson.JSONDecodeError:
        return "content is not valid JSON"
    if entry_hash(prev, content) != digest:
        return "content does not match its hash"
    if not isinstance(content, dict) or content.get("event_key", "") != event_key:
        return "event_key column does not match the entry's content"
    return None


def verify_chain(conn: duckdb.DuckDBPyConnection) -> VerifyResult:
    """Recompute the chain of the `lineage` table in `conn` from genesis.

    Works on any store that keeps the ledger (a worker's state, an API replica), read-only
    connections included. Out: ok, or the first entry whose sequence, link, key or content
    does not hold, with its event key and what is wrong.
    """
    prev, expected_seq, count = GENESIS_HASH, 1, 0
    cursor = conn.execute("SELECT seq, event_key, entry, prev_hash, hash FROM lineage ORDER BY seq")
    while rows := cursor.fetchmany(10_000):
        for seq, event_key, entry, prev_hash, digest in rows:
            count += 1
            problem = _entry_problem(seq, expected_seq, event_key, entry, prev_hash, prev, digest)
            if problem is not None:
                return VerifyResult(False, count, seq, problem, event_key)
            prev, expected_seq = digest, expected_seq + 1
    return VerifyResult(True, count)


def _compress_entries(conn: duckdb.DuckDBPyConnection) -> None:
    """Rewrite, once, a ledger created before its entries were compressed with zstd: a
    column's compression is set when its table is created. Same rows, in one transaction
    (~2.6 CPU-s for 630,000 entries)."""
    ((sql,),) = conn.execute(
        "SELECT sql FROM duckdb_tables() WHERE table_name = 'lineage' "
        "AND database_name = current_database() AND schema_name = current_schema()"
    ).fetchall()
    if "USING COMPRESSION ZSTD" in sql.upper():
        return
    rewrite_table(conn, "lineage", _COLUMNS, order_by="seq")


def rewrite_table(
    conn: duckdb.DuckDBPyConnection, table: str, columns: str, order_by: str = ""
) -> None:
    """Recreate `table` with the definition `columns` and the same rows (in `order_by`
    order, if given), in one transaction: how a stored table takes a definition DuckDB
    cannot alter in place (a column's compression, a dropped primary key)."""
    staged = f"_{table}_rewritten"
    order = f" ORDER BY {order_by}" if order_by else ""
    conn.execute("BEGIN TRANSACTION")
    try:
        conn.execute(f"CREATE TABLE {staged} ({columns})")
        conn.execute(f"INSERT INTO {staged} SELECT * FROM {table}{order}")
        conn.execute(f"DROP TABLE {table}")
        conn.execute(f"ALTER TABLE {staged} RENAME TO {table}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


class LineageLedger:
    """The ledger in DuckDB; appends happen inside the caller's transaction."""

    def __init__(self, conn: duckdb.DuckDBPyConnection) -> None:
        self.conn = conn
        # The last head seen (seq, hash), or None: the head is at or after it unless a
        # rollback undid appends.
        self._seen: tuple[int, str] | None = None
        conn.execute(SCHEMA_SQL)
        _compress_entries(conn)

    def head(self) -> tuple[int, str]:
        """The last sequence number and hash (0 and the genesis hash when empty)."""
        if self._seen is not None:
            # Still the head when that entry is stored as seen and none follows it: two
            # reads of the key index (~0.26 ms), where the top-1 over the row groups after
            # it cost ~0.75 ms a batch. Otherwise (a rollback undid it, another writer
            # appended) the head is asked for again over all.
            seq, digest = self._seen
            rows = self.conn.execute(
                "SELECT seq, hash FROM lineage WHERE seq IN (?, ?)", [seq, seq + 1]
            ).fetchall()
            if rows == [(seq, digest)]:
                return seq, digest
        rows = self.conn.execute(
            "SELECT seq, hash FROM lineage ORDER BY seq DESC LIMIT 1"
        ).fetchall()
        if not rows:
            return 0, GENESIS_HASH
        self._seen = (rows[0][0], rows[0][1])
        return self._seen

    def append(self, entries: list[dict[str, Any]]) -> list[LedgerEntry]:
        """Chain and store entries in order. In: entry contents. Out: the chained entries."""
        if not entries:
            return []
        seq, prev = self.head()
        chained: list[LedgerEntry] = []
        # Each entry serialised once: the text its hash covers is the text stored. Kept as
        # str, not orjson's bytes: a kept orjson result holds fresh memory well beyond its
        # length (page faults), and pyarrow reads str four times as fast as bytes.
        texts: list[str] = []
        for entry in entries:
            seq += 1
            body = canonical_json(entry)
            digest = _body_hash(prev, body)
            chained.append(LedgerEntry(seq, entry, prev, digest))
            texts.append(body.decode())
            prev = digest
        store_entries(self.conn, chained, texts=texts)
        self._seen = (seq, prev)
        return chained

    def verify(self) -> VerifyResult:
        """Recompute the chain from genesis; report the first entry whose hash does not hold."""
        return verify_chain(self.conn)
