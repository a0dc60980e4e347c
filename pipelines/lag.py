"""Consumer lag per partition: how far a reader is behind the end of each topic partition.

The end of a partition is taken from a fetch response's high-water mark, not from
ListOffsets, which the embedded broker answers wrongly after multi-record batches (see
DESIGN.md). The worker's position is its consumer group's committed offset, which Faust
commits on a timer (see pipelines/faust_engine.py): a progress indicator that can differ
from the offsets stored with the worker's state by about a batch, which is what lag needs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

WORKER_GROUP = "tessera-worker"  # the Faust app id: its consumer group


@dataclass(frozen=True)
class PartitionLag:
    """One partition: the reader's next offset (None: nothing committed yet), the end, the lag."""

    reader: str
    topic: str
    partition: int
    position: int | None
    end: int
    lag: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def high_watermarks(
    bootstrap: str, partitions: Iterable[tuple[str, int]], timeout: float = 5.0
) -> dict[tuple[str, int], int]:
    """The end offset of each (topic, partition), read from fetch responses.

    Out: the partitions whose end was learnt within `timeout` (an unanswered one is left out).
    """
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    from pipelines.kafka import client_config

    wanted = sorted(set(partitions))
    if not wanted:
        return {}
    consumer = Consumer(
        client_config(
            bootstrap,
            **{
                "group.id": "tessera-lag-probe",  # never joins nor commits
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",  # offset 0 may be gone to retention
                "max.partition.fetch.bytes": 1024,  # one small fetch per partition is enough
                "fetch.wait.max.ms": 10,
            },
        )
    )
    ends: dict[tuple[str, int], int] = {}
    try:
        consumer.assign([TopicPartition(t, p, 0) for t, p in wanted])
        deadline = time.monotonic() + timeout
        seen: set[tuple[str, int]] = set()
        while len(seen) < len(wanted) and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=len(wanted) * 4, timeout=0.1):
                error = message.error()
                if error is None or error.code() == KafkaError._PARTITION_EOF:
                    seen.add((message.topic(), message.partition()))
        for topic, partition in seen:
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
            if high >= 0:
                ends[(topic, partition)] = high
    finally:
        consumer.close()
    return ends


def group_positions(
    bootstrap: str, group: str, topic_names: Iterable[str], timeout: float = 5.0
) -> dict[tuple[str, int], int | None]:
    """Every partition of `topic_names` with `group`'s committed offset (None: none yet)."""
    from confluent_kafka import Consumer, TopicPartition

    from pipelines.kafka import client_config

    consumer = Consumer(
        client_config(bootstrap, **{"group.id": group, "enable.auto.commit": False})
    )
    try:
        metadata = consumer.list_topics(timeout=timeout)
        partitions = [
            TopicPartition(topic, p)
            for topic in topic_names
            if topic in metadata.topics
            for p in sorted(metadata.topics[topic].partitions)
        ]
        committed = consumer.committed(partitions, timeout=timeout) if partitions else []
    finally:
        consumer.close()
    return {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None) for tp in committed}


def lag_report(
    bootstrap: str, positions: Mapping[str, Mapping[tuple[str, int], int | None]]
) -> list[PartitionLag]:
    """Lag per reader and partition. In: reader name -> (topic, partition) -> next offset."""
    ends = high_watermarks(bootstrap, {tp for reader in positions.values() for tp in reader})
    report = []
    for reader, by_partition in positions.items():
        for (topic, partition), position in sorted(by_partition.items()):
            end = ends.get((topic, partition))
            if end is None:
                continue
            report.append(
                PartitionLag(reader, topic, partition, position, end, max(end - (position or 0), 0))
            )
    return report
