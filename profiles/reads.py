"""The profile API's read path: recently read documents, and point reads that share a query.

A DuckDB query costs about half a millisecond of CPU whatever it reads (parse, bind,
plan, run), against tens of microseconds per extra id probed through the primary-key
index in the same query. At a thousand lookups a second the per-request query, not the
lookup, saturates the API; so concurrent reads share queries (`CoalescedReads`), and
documents read recently are kept, compressed as stored, until a write changes them
(`DocumentCache`).
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from starlette.concurrency import run_in_threadpool

T = TypeVar("T")


class DocumentCache:
    """Stored (compressed) documents by person id, least recently read dropped first.

    Writers call `invalidate` after they commit; a reader records `generation` before its
    query and offers what it read with `put`, which refuses it when any write committed
    meanwhile, so a document read before a change can never be kept after it.
    """

    def __init__(self, capacity: int = 50_000) -> None:
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._generation = 0
        self._lock = threading.Lock()

    @property
    def generation(self) -> int:
        """The count of writes so far: pass it back to `put`."""
        return self._generation

    def get(self, person_id: str) -> bytes | None:
        """The cached document of `person_id`, or None."""
        with self._lock:
            blob = self._entries.get(person_id)
            if blob is None:
                self.misses += 1
                return None
            self._entries.move_to_end(person_id)
            self.hits += 1
            return blob

    def put(self, rows: Iterable[tuple[str, bytes]], generation: int) -> bool:
        """Keep (person id, document) pairs read when `generation` was current; False
        (nothing kept) when a write has committed since."""
        if self.capacity <= 0:
            return False
        with self._lock:
            if generation != self._generation:
                return False
            for person_id, blob in rows:
                self._entries[person_id] = blob
                self._entries.move_to_end(person_id)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            return True

    def invalidate(self, person_ids: Iterable[str]) -> None:
        """Forget these persons' documents; refuse every read still in flight."""
        with self._lock:
            self._generation += 1
            for person_id in person_ids:
                self._entries.pop(person_id, None)

    def __len__(self) -> int:
        return len(self._entries)


class CoalescedReads(Generic[T]):
    """Keyed reads for an event loop: one query in flight, and the reads that arrive while
    it runs share the next one (at most `max_batch` keys).

    A lone read on an idle server gets a query of its own at once; under load the cost
    of a query is shared by every request waiting for it. `fetch` runs in the thread
    pool (DuckDB releases the GIL while it works, so the loop keeps serving meanwhile)
    and maps each key it was given to its value (absent: None).
    """

    def __init__(self, fetch: Callable[[list[str]], dict[str, T | None]], max_batch: int = 100):
        self._fetch = fetch
        self._max_batch = max_batch
        self._pending: dict[str, list[asyncio.Future]] = {}
        self._draining: asyncio.Task | None = None

    async def get(self, key: str) -> T | None:
        """The value for `key`, read together with whatever else is waiting."""
        future = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key, []).append(future)
        if self._draining is None or self._draining.done():
            self._draining = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            keys = list(self._pending)[: self._max_batch]
            waiters = [(key, self._pending.pop(key)) for key in keys]
            try:
                found = await run_in_threadpool(self._fetch, keys)
            except Exception as exc:  # every waiter of this query sees the failure
                for _, futures in waiters:
                    for future in futures:
                        if not future.done():
                            future.set_exception(exc)
                continue
            for key, futures in waiters:
                for future in futures:
                    if not future.done():  # a caller that hung up was cancelled
                        future.set_result(found.get(key))
