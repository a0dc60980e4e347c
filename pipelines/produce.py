"""Sending event files to the input topics, each event routed by its kind."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from consent.keys import SubjectKeyStore
from pipelines.kafka import BatchProducer
from pipelines.pipeline import OutRecord
from pipelines.topics import route


def read_lines(path: Path) -> Iterator[bytes]:
    """The events of a JSONL file as raw bytes, blank lines skipped, bytes untouched."""
    with path.open("rb") as handle:
        for line in handle:
            line = line.rstrip(b"\r\n")
            if line:
                yield line


def produce_events(
    events: Iterable[bytes],
    bootstrap: str,
    chunk: int = 20_000,
    progress: Callable[[int], None] | None = None,
    keys: SubjectKeyStore | None = None,
) -> Counter:
    """Route and produce raw events; returns how many went to each topic.

    Bytes are sent exactly as given (garbage included): rejecting is the pipeline's job.
    With a key store, each event that names a subject is sealed under its subjects' key
    (and keyed by a hash), so erasure can shred it on the input topic too.
    """
    producer = BatchProducer(bootstrap)
    per_topic: Counter = Counter()
    pending: list[OutRecord] = []

    def flush() -> None:
        if keys is not None:
            pending[:] = sealed(keys, pending)
        producer.send(pending)
        if progress:
            progress(len(pending))
        pending.clear()

    for raw in events:
        topic, key = route(raw)
        per_topic[topic] += 1
        pending.append(OutRecord(topic, key, raw))
        if len(pending) >= chunk:
            flush()
    if pending:
        flush()
    producer.close()
    return per_topic


def sealed(keys: SubjectKeyStore, records: list[OutRecord]) -> list[OutRecord]:
    """Events sealed under their subjects' keys, with partition keys that are hashes.

    Bytes that name nobody go as they are (the contract rejects them); a partition key is
    hashed either way, since it is a user id or an anonymous id.
    """
    values = keys.seal_events([r.value or b"" for r in records])
    return [
        OutRecord(
            r.topic,
            hashlib.blake2b(r.key, digest_size=12).hexdigest().encode() if r.key else None,
            value,
        )
        for r, value in zip(records, values, strict=True)
    ]
