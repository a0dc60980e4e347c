"""The profile API's read path: recently read documents, and point reads that share a query.

A DuckDB query costs about half a millisecond of CPU whatever it reads (parse, bind,
plan, run), against tens of microseconds per extra id probed through the primary-key
index in the same query. At a thousand lookups a second the per-request query, not the
lookup, saturates the API; so concurrent reads share queries (`CoalescedReads`), and
documents read recently are kept, compressed as stored (`DocumentCache`): a write puts
the person's new document in place of the old one. The answers the API rendered from
them (a purpose's view, a trait selection, its ETag) are kept beside them until a write
to the person drops them, so a repeated read costs neither decompression, nor the purpose
view, nor JSON encoding. Which person holds each identifier is kept in memory too once
loaded (`IdentifierIndex`), so a lookup by identifier costs no query either.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, Generic, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

T = TypeVar("T")


class DocumentCache:
    """Stored (compressed) documents by person id, and answers rendered from them by
    person id and request shape; least recently read dropped first.

    Writers call `invalidate` after they commit; a reader records `generation` before its
    query and offers what it read with `put` (or what it rendered with `keep_answer`),
    which refuses it when any write committed meanwhile, so nothing read before a change
    can be kept after it.

    A person's answers are one tuple of (shape, answer) pairs, replaced whole: with
    hashable shapes of strings, tuples and None, and answers of bytes, strings and dates,
    the collector stops tracking them, so a cache of a million entries adds nothing to
    the garbage collector's full passes (which would stall the event loop).
    """

    def __init__(self, capacity: int = 50_000, answer_capacity: int = 50_000) -> None:
        self.capacity = capacity
        self.answer_capacity = answer_capacity  # persons whose answers are kept
        self.hits = 0
        self.misses = 0
        self.answer_hits = 0
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        # person id -> ((request shape, answer), ...): a write to the person drops them all.
        self._answers: OrderedDict[str, tuple[tuple[Hashable, Any], ...]] = OrderedDict()
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
            for kept, found in self._answers.get(person_id, ()):
                if kept == shape:
                    self._answers.move_to_end(person_id)
                    self.answer_hits += 1
                    return found
            return None

    def keep_answer(self, person_id: str, shape: Hashable, answer: Any, generation: int) -> bool:
        """Keep an answer rendered from `person_id`'s document as read when `generation`
        was current; False (nothing kept) when a write has committed since."""
        if self.answer_capacity <= 0:
            return False
        with self._lock:
            if generation != self._generation:
                return False
            others = tuple(p for p in self._answers.get(person_id, ()) if p[0] != shape)
            self._answers[person_id] = (*others, (shape, answer))
            self._answers.move_to_end(person_id)
            while len(self._answers) > self.answer_capacity:
                self._answers.popitem(last=False)
            return True

    def invalidate(
        self, person_ids: Iterable[str], fresh: Mapping[str, bytes] | None = None
    ) -> None:
        """Forget these persons' documents and answers; refuse every read still in flight.

        `fresh`: documents the write just committed (stored form), kept in place of the
        old ones of persons the cache held, or added while it has room, so a warm cache
        stays warm under writes.
        """
        fresh = fresh or {}
        with self._lock:
            self._generation += 1
            for person_id in person_ids:
                self._answers.pop(person_id, None)
                blob = fresh.get(person_id)
                if (
                    blob is not None
                    and self.capacity > 0
                    and (person_id in self._entries or len(self._entries) < self.capacity)
                ):
                    self._entries[person_id] = blob
                    self._entries.move_to_end(person_id)
                else:
                    self._entries.pop(person_id, None)

    def __len__(self) -> int:
        return len(self._entries)


class IdentifierIndex:
    """Which person holds each identifier, in memory, exactly as the store's
    `profile_identifiers` table says, so a lookup by identifier costs no query.

    An identifier is keyed by the first 16 bytes of the SHA-256 of `type:value`
    (normalised), as DuckDB computes it when the index is loaded and Python when it is
    read: about 20 bytes per identifier in sorted NumPy arrays (a binary search per
    read), with the person ids in one Arrow string array, so the collector has nothing to
    walk. (Two identifiers share a key with probability about n²/2¹²⁹: 10⁻²⁵ at 10⁷.)
    Writes land in a small dict that takes precedence and is merged into the arrays once
    it holds `overlay_limit` keys, so memory stays bounded by the identifiers stored.

    Until `load` has run the index is not `loaded` and readers must ask the store. A
    writer reports every change with `changed` after it commits, from the moment `begin`
    is called: a load's snapshot taken after `begin` plus the changes since is exact.
    """

    def __init__(self, capacity: int = 20_000_000, overlay_limit: int = 100_000) -> None:
        self.capacity = capacity  # identifiers at most; a larger store is not loaded
        self.overlay_limit = overlay_limit
        self.loaded = False
        self._recording = False
        self._keys = np.empty(0, dtype="S16")
        self._slots = np.empty(0, dtype=np.int32)
        self._persons = pa.array([], pa.string())
        self._overlay: dict[bytes, str | None] = {}  # None: nobody holds it any more
        self._lock = threading.Lock()

    @staticmethod
    def key(id_type: str, value: str) -> bytes:
        """The index key of a normalised identifier."""
        return hashlib.sha256(f"{id_type}:{value}".encode()).digest()[:16]

    # The same key in DuckDB SQL, over columns id_type and id_value.
    KEY_SQL = "unhex(left(sha256(id_type || ':' || id_value), 32))"

    def person(self, id_type: str, value: str) -> str | None:
        """The person holding the normalised identifier, or None; only when `loaded`."""
        key = self.key(id_type, value)
        with self._lock:
            if key in self._overlay:
                return self._overlay[key]
            keys = self._keys
            at = int(keys.searchsorted(key))
            if at < len(keys) and keys[at] == key.rstrip(b"\x00"):  # NumPy strips NULs
                return self._persons[int(self._slots[at])].as_py()
            return None

    def begin(self) -> None:
        """Start recording writes: call before taking the snapshot `load` is given."""
        with self._lock:
            self._recording = True

    @property
    def recording(self) -> bool:
        """True while writes must be reported with `changed`."""
        return self._recording

    def abandon(self) -> None:
        """Give up loading: stop recording writes; readers keep asking the store."""
        with self._lock:
            self._recording, self._overlay, self.loaded = False, {}, False

    def load(self, table: pa.Table) -> bool:
        """Install a snapshot: a table of `key` (16-byte binary, as `KEY_SQL`) and
        `person_id`, one row per stored identifier. False (nothing loaded, reads go to the
        store) when it holds more than `capacity` identifiers."""
        if table.num_rows > self.capacity:
            self.abandon()
            return False
        keys = _fixed_keys(table.column("key"))
        persons = pc.dictionary_encode(table.column("person_id").combine_chunks())
        slots = persons.indices.to_numpy(zero_copy_only=False).astype(np.int32)
        order = _key_order(keys)
        with self._lock:
            self._keys, self._slots, self._persons = keys[order], slots[order], persons.dictionary
            self.loaded = True
        self._fold()
        return True

    def changed(
        self, removed: Iterable[tuple[str, str]], added: Iterable[tuple[str, str, str]]
    ) -> None:
        """A committed write: identifiers (type, value) no longer held by their person, then
        identifiers (type, value, person id) now held, in that order. One writer at a time
        (the store calls it under its write lock)."""
        with self._lock:
            if not self._recording:
                return
            for id_type, value in removed:
                self._overlay[self.key(id_type, value)] = None
            for id_type, value, person in added:
                self._overlay[self.key(id_type, value)] = person
        self._fold()

    def _fold(self) -> None:
        """Fold a full overlay into the sorted arrays. The new arrays are built outside
        the lock (readers go on with the old ones and the overlay) and swapped in; no
        write can come meanwhile, as only the one writer calls this."""
        with self._lock:
            if not self.loaded or len(self._overlay) < self.overlay_limit:
                return
            keys, slots, persons, overlay = self._keys, self._slots, self._persons, self._overlay
        merged = _merged(keys, slots, persons, overlay)
        with self._lock:
            self._keys, self._slots, self._persons = merged
            self._overlay = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys) + sum(1 for p in self._overlay.values() if p is not None)

    def footprint(self) -> dict[str, int]:
        """Identifiers indexed, writes not yet merged, and the bytes the index holds."""
        with self._lock:
            overlay = len(self._overlay)
            held = self._keys.nbytes + self._slots.nbytes + self._persons.nbytes
            # A dict slot, a 16-byte key object and a person id string per pending write.
            held += overlay * 160
            return {"identifiers": len(self._keys), "pending_writes": overlay, "bytes": held}


def _merged(
    keys: np.ndarray, slots: np.ndarray, persons: pa.Array, overlay: dict[bytes, str | None]
) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """Sorted keys, person slots and persons with the overlay's changes applied."""
    changed = np.array(sorted(overlay), dtype="S16")
    at = np.minimum(keys.searchsorted(changed), max(len(keys) - 1, 0))
    keep = np.ones(len(keys), dtype=bool)
    if len(keys):
        keep[at[keys[at] == changed]] = False
    # Persons no longer referenced leave the person array.
    used, kept_slots = np.unique(slots[keep], return_inverse=True)
    live = [(k, p) for k, p in sorted(overlay.items()) if p is not None]
    new_keys = np.array([k for k, _ in live], dtype="S16")
    new_slots = np.arange(len(used), len(used) + len(live), dtype=np.int32)
    kept_keys = keys[keep]
    where = kept_keys.searchsorted(new_keys)
    return (
        np.insert(kept_keys, where, new_keys),
        np.insert(kept_slots.astype(np.int32), where, new_slots),
        pa.concat_arrays(
            [persons.take(pa.array(used)), pa.array([p for _, p in live], pa.string())]
        ),
    )


def _key_order(keys: np.ndarray) -> np.ndarray:
    """The sorting permutation of `S16` keys: by their first 8 bytes as an integer (several
    times faster than comparing strings), or by whole keys if two share those bytes."""
    if not len(keys):
        return np.empty(0, dtype=np.intp)
    head = keys.view(">u8")[::2].astype(np.uint64)
    order = np.argsort(head)
    ordered = head[order]
    if bool(np.any(ordered[1:] == ordered[:-1])):
        return np.argsort(keys, kind="stable")
    return order


def _fixed_keys(column: pa.ChunkedArray) -> np.ndarray:
    """A binary column of 16-byte keys as a NumPy `S16` array (one copy)."""
    fixed = column.cast(pa.binary(16)).combine_chunks()
    if len(fixed) == 0:
        return np.empty(0, dtype="S16")
    data = fixed.buffers()[1]
    return np.frombuffer(data, dtype="S16", count=len(fixed), offset=fixed.offset * 16).copy()


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
