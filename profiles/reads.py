"""The profile API's read path: recently read documents, and point reads that share a query.

A DuckDB query costs about half a millisecond of CPU whatever it reads (parse, bind,
plan, run), against tens of microseconds per extra id probed through the primary-key
index in the same query. At a thousand lookups a second the per-request query, not the
lookup, saturates the API; so concurrent reads share queries (`CoalescedReads`), and
documents read recently are kept, compressed as stored, until a write changes them
(`DocumentCache`). The answers the API rendered from them (a purpose's view, a trait
selection, its ETag) are kept beside them under the same rule, so a repeated read costs
neither decompression, nor the purpose view, nor JSON encoding.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class DocumentCache:
    """Stored (compressed) documents by person id, and answers rendered from them by
    person id and request shape; least recently read dropped first.

    Writers call `invalidate` after they commit; a reader records `generation` before its
    query and offers what it read with `put` (or what it rendered with `keep_answer`),
    which refuses it when any write committed meanwhile, so nothing read before a change
    can be kept after it.
    """

    def __init__(self, capacity: int = 50_000, answer_capacity: int = 50_000) -> None:
        self.capacity = capacity
        self.answer_capacity = answer_capacity  # persons whose answers are kept
        self.hits = 0
        self.misses = 0
        self.answer_hits = 0
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        # person id -> request shape -> answer: a write to the person drops them all.
        self._answers: OrderedDict[str, dict[Hashable, Any]] = OrderedDict()
        self._generation = 0
        self._lock = threading.Lock()

    @property
    def generation(self) -> int:
        """The count of writes so far: pass it back to `put`."""
        return self._generation

    def get(self, person_id: str) -> bytes | None:
        """The cached document of `person_id`, or None (the reader counts its misses with
        `missed` when it queries for them)."""
        with self._lock:
            blob = self._entries.get(person_id)
            if blob is None:
                return None
            self._entries.move_to_end(person_id)
            self.hits += 1
            return blob

    def missed(self, count: int) -> None:
        """Count documents that had to be read from the store."""
        with self._lock:
            self.misses += count

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

    def answer(self, person_id: str, shape: Hashable) -> Any | None:
        """The answer kept for `person_id` read in `shape`, or None."""
        with self._lock:
            shapes = self._answers.get(person_id)
            found = shapes.get(shape) if shapes is not None else None
            if found is not None:
                self._answers.move_to_end(person_id)
                self.answer_hits += 1
            return found

    def keep_answer(self, person_id: str, shape: Hashable, answer: Any, generation: int) -> bool:
        """Keep an answer rendered from `person_id`'s document as read when `generation`
        was current; False (nothing kept) when a write has committed since."""
        if self.answer_capacity <= 0:
            return False
        with self._lock:
            if generation != self._generation:
                return False
            shapes = self._answers.get(person_id)
            if shapes is None:
                shapes = self._answers[person_id] = {}
            else:
                self._answers.move_to_end(person_id)
            shapes[shape] = answer
            while len(self._answers) > self.answer_capacity:
                self._answers.popitem(last=False)
            return True

    def invalidate(self, person_ids: Iterable[str]) -> None:
        """Forget these persons' documents and answers; refuse every read still in flight."""
        with self._lock:
            self._generation += 1
            for person_id in person_ids:
                self._entries.pop(person_id, None)
                self._answers.pop(person_id, None)

    def __len__(self) -> int:
        return len(self._entries)


class CoalescedReads(Generic[T]):
    """Keyed reads for an event loop: the reads that reach the loop together share one
    `fetch` (at most `max_batch` keys per call).

    A read registers its key and yields; the fetch runs once the loop has given every
    request that arrived with it its turn, so a lone read on an idle server waits for
    nothing, and under load one query serves every request that queued meanwhile.
    `fetch` maps each key it was given to its value (absent: None). It runs on the loop
    itself: a hop to a worker thread costs more than the point query it would overlap.
    """

    def __init__(self, fetch: Callable[[list[str]], dict[str, T | None]], max_batch: int = 100):
        self._fetch = fetch
        self._max_batch = max_batch
        self._pending: dict[str, list[asyncio.Future]] = {}

    async def get(self, key: str) -> T | None:
        """The value for `key`, read together with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            loop.call_soon(self._drain)
        self._pending.setdefault(key, []).append(future)
        return await future

    def _drain(self) -> None:
        waiting = list(self._pending.items())
        self._pending.clear()
        for start in range(0, len(waiting), self._max_batch):
            batch = waiting[start : start + self._max_batch]
            try:
                found = self._fetch([key for key, _ in batch])
            except Exception as exc:  # every waiter of this query sees the failure
                for _, futures in batch:
                    for future in futures:
                        if not future.done():
                            future.set_exception(exc)
                continue
            for key, futures in batch:
                for future in futures:
                    if not future.done():  # a caller that hung up was cancelled
                        future.set_result(found.get(key))
