"""Bundles: many consumed records in one Kafka message, bytes and positions untouched.

Ingest workers forward their share of the input partitions to the stage owner as
bundles (pipelines/ingest.py): one Arrow IPC stream per micro-batch, so the owner reads
one message per batch instead of one per event, and every record keeps the topic,
partition, offset, key and bytes it arrived with (lineage and dead letters cite them).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from pipelines.pipeline import SourceRecord

BUNDLE_SCHEMA = pa.schema(
    [
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("key", pa.binary()),
        ("value", pa.binary()),
    ]
)
# Below Apache Kafka's default max.message.bytes (1 MiB) with room for the IPC framing.
MAX_BUNDLE_BYTES = 900_000


def _encode(records: Sequence[SourceRecord]) -> bytes:
    table = pa.Table.from_pydict(
        {
            "topic": [r.topic for r in records],
            "partition": [r.partition for r in records],
            "offset": [r.offset for r in records],
            "key": [r.key for r in records],
            "value": [r.value for r in records],
        },
        schema=BUNDLE_SCHEMA,
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, BUNDLE_SCHEMA) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def encode_bundles(
    records: Sequence[SourceRecord], max_bytes: int = MAX_BUNDLE_BYTES
) -> list[bytes]:
    """Consumed records as bundles of at most about `max_bytes` each, in the given order.

    A record larger than `max_bytes` travels alone in its bundle.
    """
    bundles: list[bytes] = []
    chunk: list[SourceRecord] = []
    size = 0
    for record in records:
        weight = len(record.value or b"") + len(record.key or b"") + len(record.topic) + 16
        if chunk and size + weight > max_bytes:
            bundles.append(_encode(chunk))
            chunk, size = [], 0
        chunk.append(record)
        size += weight
    if chunk:
        bundles.append(_encode(chunk))
    return bundles


def decode_bundle(data: bytes) -> list[SourceRecord]:
    """One bundle's records, with their original topic, partition, offset, key and bytes."""
    columns = pa.ipc.open_stream(data).read_all().to_pydict()
    return [
        SourceRecord(topic, partition, offset, value, key)
        for topic, partition, offset, key, value in zip(
            columns["topic"],
            columns["partition"],
            columns["offset"],
            columns["key"],
            columns["value"],
            strict=True,
        )
    ]
