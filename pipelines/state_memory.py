"""How much memory the stage owner's DuckDB state may hold, and where it spills beyond that.

Left alone, DuckDB lets its buffer pool grow to 80% of the machine's memory: it keeps every
block of the state file it has read, and the rows a batch wrote until a checkpoint folds
them into the file. Beside it the process holds the Python side (the identity candidate
index, the stored keys' hashes, a batch's rows), so a worker that shares a machine or runs
in a container with a memory limit needs DuckDB's share bounded.

Two settings, read from the environment when the state is opened:

- `TESSERA_STATE_MEMORY_LIMIT`: DuckDB's `memory_limit` (`DEFAULT_MEMORY_LIMIT` unless set),
  a size such as `1GB`, `1536MB` or `2GiB`. Past it DuckDB evicts cached blocks of the
  state file (read again from the file when needed) and spills what it cannot evict to the
  temporary directory; what can neither be evicted nor spilled fails the batch with an
  out-of-memory error, and the batch is retried, never dead-lettered.
- `TESSERA_STATE_TEMP_DIR`: DuckDB's `temp_directory`; by default a folder beside the
  state file (`state.duckdb.tmp`), so a spill lands on the state's volume, not in /tmp.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import duckdb

MEMORY_LIMIT_ENV = "TESSERA_STATE_MEMORY_LIMIT"
TEMP_DIR_ENV = "TESSERA_STATE_TEMP_DIR"
DEFAULT_MEMORY_LIMIT = "2GB"

_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class StateMemory:
    """DuckDB's memory limit (a size string) and temporary directory (None: beside the file)."""

    memory_limit: str = DEFAULT_MEMORY_LIMIT
    temp_directory: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StateMemory:
        """The settings named by `TESSERA_STATE_MEMORY_LIMIT` and `TESSERA_STATE_TEMP_DIR`
        (in `env`, default os.environ); raises ValueError for a limit that is not a size."""
        env = os.environ if env is None else env
        limit = env.get(MEMORY_LIMIT_ENV, "").strip() or DEFAULT_MEMORY_LIMIT
        if not _SIZE.match(limit):
            raise ValueError(
                f"{MEMORY_LIMIT_ENV}={limit!r} is not a size such as 1GB, 1536MB or 2GiB"
            )
        return cls(limit, env.get(TEMP_DIR_ENV, "").strip() or None)

    def apply(self, conn: duckdb.DuckDBPyConnection, path: Path | str) -> None:
        """Set the limit and the temporary directory on `conn`, the state opened at `path`.

        Set after opening rather than as connection config: DuckDB refuses a second
        connection to a file open with a different config, and readers in the same process
        (audits, tests) open the state with none. So the WAL replayed at open (at most a
        checkpoint threshold's worth) is read before the limit holds."""
        conn.execute(f"SET memory_limit = '{self.memory_limit}'")
        temp = self.temp_directory
        if temp is None and str(path) != ":memory:":
            temp = f"{Path(path).resolve()}.tmp"
        if temp is not None:
            conn.execute("SET temp_directory = '" + temp.replace("'", "''") + "'")
