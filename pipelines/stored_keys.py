"""Which event keys the outcomes table may hold, answered without reading the table.

The dedup lookup of a batch (`Pipeline._classify`) joined the batch's keys against the whole
outcomes table: a scan of every stored key per batch, whose cost grows with the store
(0.16-0.25 CPU-s per 10,000-event batch at 3M outcomes). The table's ART index does not
help a batch: probing it costs ~30 us a key, more than the scan for 10,000 keys below
~5M rows (DuckDB 2.0, measured), and the planner never uses it for a join.

`StoredKeys` keeps the DuckDB `hash()` of every stored key in one sorted numpy array
(8 bytes a key), loaded from the table on first use and extended as outcomes are
inserted. A key whose hash it lacks is certainly not stored; only keys whose hash it
holds (replays, reused message ids, and 64-bit hash collisions) go to the table, read
through its key index while they are few. It must
hold every stored key: the pipeline drops it when a batch rolls back (`forget`), and the
next batch loads it again from what was committed.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa


class StoredKeys:
    """The hashes of the keys in one column of a table, sorted; a membership pre-filter.

    Two sorted arrays: all hashes but the latest, and the latest few, folded into the first
    once they pass a sixteenth of it, so an insert copies a small array, not every hash."""

    def __init__(self, conn: duckdb.DuckDBPyConnection, table: str, column: str) -> None:
        self.conn = conn
        self.table, self.column = table, column
        self._hashes: np.ndarray | None = None
        self._recent = np.empty(0, np.uint64)

    def _hashes_of(self, relation: str) -> np.ndarray:
        found = self.conn.execute(f'SELECT hash("{self.column}") AS h FROM "{relation}"')
        return np.sort(np.asarray(found.fetchnumpy()["h"], dtype=np.uint64))

    def _hashes_in(self, keys: pa.Table) -> np.ndarray:
        """The hashes of the keys of `keys` (an Arrow table with the column), in its order."""
        # DuckDB reads the local table by its name (a replacement scan): no register and
        # unregister, ~0.4 ms a statement.
        _stored_keys_batch = keys  # read by the statement below
        found = self.conn.execute(f'SELECT hash("{self.column}") AS h FROM _stored_keys_batch')
        return np.asarray(found.fetchnumpy()["h"], dtype=np.uint64)

    def _loaded(self) -> np.ndarray:
        if self._hashes is None:
            self._hashes = self._hashes_of(self.table)
            self._recent = np.empty(0, np.uint64)
        return self._hashes

    def maybe_stored(self, keys: pa.Table) -> list[str]:
        """The keys of `keys` (an Arrow table with the same column) whose hash is held: a
        superset of those the table holds."""
        held = self._held(self._hashes_in(keys))
        if not held.any():  # a stream of new events: no key converted back from DuckDB
            return []
        return keys.column(self.column).filter(pa.array(held)).to_pylist()

    def holds(self, key: str) -> bool:
        """Whether `key`'s hash is held (False: the table certainly lacks `key`)."""
        ((wanted,),) = self.conn.execute("SELECT hash(?::VARCHAR)", [key]).fetchall()
        return bool(self._held(np.array([wanted], np.uint64))[0])

    def _held(self, wanted: np.ndarray) -> np.ndarray:
        """For each hash of `wanted`, whether it is held (in either sorted array)."""
        held = np.zeros(len(wanted), bool)
        for hashes in (self._loaded(), self._recent):
            if len(hashes):
                at = np.minimum(np.searchsorted(hashes, wanted), len(hashes) - 1)
                held |= hashes[at] == wanted
        return held

    def hold(self, keys: pa.Table) -> None:
        """Hold the keys of `keys` (an Arrow table with the column), just inserted into the
        table and not held before (a no-op until loaded: loading reads them from the table)."""
        if self._hashes is None:
            return
        self._fold(np.sort(self._hashes_in(keys)))

    def insert(self, rows: pa.Table) -> None:
        """Insert `rows` (an Arrow table, its columns by name) into the table and hold their
        keys: the insert returns their hashes, where `hold` reads the rows again (~0.4 ms a
        batch of 1,000)."""
        _stored_keys_rows = rows  # read by the statement below (a replacement scan)
        inserted = self.conn.execute(
            f'INSERT INTO "{self.table}" BY NAME SELECT * FROM _stored_keys_rows '
            f'RETURNING hash("{self.column}") AS h'
        ).fetchnumpy()
        if self._hashes is not None:
            self._fold(np.sort(np.asarray(inserted["h"], dtype=np.uint64)))

    def _fold(self, new: np.ndarray) -> None:
        """Hold `new` (sorted hashes) beside the loaded ones."""
        assert self._hashes is not None
        self._recent = np.insert(self._recent, np.searchsorted(self._recent, new), new)
        if len(self._recent) > max(len(self._hashes) // 16, 65_536):
            at = np.searchsorted(self._hashes, self._recent)
            self._hashes = np.insert(self._hashes, at, self._recent)
            self._recent = np.empty(0, np.uint64)

    def forget(self) -> None:
        """Drop the hashes (after a rolled-back insert): the next use loads them again."""
        self._hashes = None
        self._recent = np.empty(0, np.uint64)
