"""The lineage ledger: an append-only, hash-chained record of every consent decision.

Each entry's hash covers its content and the previous entry's hash, so changing,
removing or reordering any entry breaks every hash after it; `verify` names the first.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import duckdb
import orjson
import pyarrow as pa

GENESIS_HASH = "0" * 64

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS lineage (
    seq BIGINT PRIMARY KEY,
    event_key VARCHAR NOT NULL,
    entry JSON NOT NULL,
    prev_hash VARCHAR NOT NULL,
    hash VARCHAR NOT NULL
);
"""


def entry_hash(prev_hash: str, entry: dict[str, Any]) -> str:
    """sha256 over the previous hash and the entry's canonical JSON (sorted keys)."""
    body = orjson.dumps(entry, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(prev_hash.encode() + body).hexdigest()


@dataclass(frozen=True)
class LedgerEntry:
    """One chained entry: its position, content and the hashes that chain it."""

    seq: int
    entry: dict[str, Any]
    prev_hash: str
    hash: str

    def as_record(self) -> dict[str, Any]:
        return {**self.entry, "seq": self.seq, "prev_hash": self.prev_hash, "hash": self.hash}


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries: int
    first_broken_seq: int | None = None
    problem: str | None = None


class LineageLedger:
    """The ledger in DuckDB; appends happen inside the caller's transaction."""

    def __init__(self, conn: duckdb.DuckDBPyConnection) -> None:
        self.conn = conn
        conn.execute(SCHEMA_SQL)

    def head(self) -> tuple[int, str]:
        """The last sequence number and hash (0 and the genesis hash when empty)."""
        rows = self.conn.execute(
            "SELECT seq, hash FROM lineage ORDER BY seq DESC LIMIT 1"
        ).fetchall()
        return (rows[0][0], rows[0][1]) if rows else (0, GENESIS_HASH)

    def append(self, entries: list[dict[str, Any]]) -> list[LedgerEntry]:
        """Chain and store entries in order. In: entry contents. Out: the chained entries."""
        seq, prev = self.head()
        chained: list[LedgerEntry] = []
        for entry in entries:
            seq += 1
            digest = entry_hash(prev, entry)
            chained.append(LedgerEntry(seq, entry, prev, digest))
            prev = digest
        if chained:
            table = pa.table(
                {
                    "seq": [e.seq for e in chained],
                    "event_key": [e.entry.get("event_key", "") for e in chained],
                    "entry": [orjson.dumps(e.entry).decode() for e in chained],
                    "prev_hash": [e.prev_hash for e in chained],
                    "hash": [e.hash for e in chained],
                }
            )
            self.conn.register("_ledger_new", table)
            try:
                self.conn.execute("INSERT INTO lineage SELECT * FROM _ledger_new")
            finally:
                self.conn.unregister("_ledger_new")
        return chained

    def verify(self) -> VerifyResult:
        """Recompute the chain from genesis; report the first entry whose hash does not hold."""
        prev, expected_seq, count = GENESIS_HASH, 1, 0
        cursor = self.conn.execute("SELECT seq, entry, prev_hash, hash FROM lineage ORDER BY seq")
        while rows := cursor.fetchmany(10_000):
            for seq, entry, prev_hash, digest in rows:
                count += 1
                if seq != expected_seq:
                    return VerifyResult(
                        False, count, seq, f"expected seq {expected_seq}, found {seq}"
                    )
                if prev_hash != prev:
                    return VerifyResult(
                        False, count, seq, "prev_hash does not match previous entry"
                    )
                if entry_hash(prev, orjson.loads(entry)) != digest:
                    return VerifyResult(False, count, seq, "content does not match its hash")
                prev, expected_seq = digest, expected_seq + 1
        return VerifyResult(True, count)
