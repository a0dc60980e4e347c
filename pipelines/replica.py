"""The replica follower: consumes the output topics into a ProfileStore, in a background thread.

It uses no consumer group: every replica reads every partition from its own stored
offsets, so replicas are independent and a wiped one rebuilds from offset zero.
"""

from __future__ import annotations

import logging
import threading
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from pipelines.kafka import client_config
from profiles.store import FOLLOWED_TOPICS, ConsumedRecord, ProfileStore

log = logging.getLogger("tessera.replica")

# How long a fetch may wait at the broker for records. A broker that holds a fetch for its
# whole wait when records arrive meanwhile (Tansu does) delays a change by up to this much,
# half of it on average, before the replica can apply it. Shorter costs the broker CPU for
# empty fetches while idle (Tansu, measured: 0.029 of a core at 50 ms, 0.050 at 20 ms,
# 0.071 at 10 ms).
FETCH_WAIT_MS = 20


class ReplicaFollower:
    """Follows Tessera's output topics and materialises them into a store."""

    def __init__(
        self, store: ProfileStore, bootstrap: str, batch_size: int = 5000, wait: float = 0.2
    ) -> None:
        self.store = store
        self.bootstrap = bootstrap
        self.batch_size = batch_size
        self.wait = wait  # the longest one poll waits when nothing has been fetched
        self.applied = 0
        self.applies = 0  # transactions: `applied` over this is the records per apply
        self.apply_cpu = 0.0  # this thread's CPU-seconds in `ProfileStore.apply`
        self.last_error: str | None = None
        # Partitions read to their end at least once since start. End of partition comes from
        # fetch responses' high-water mark, which Tansu reports correctly (ListOffsets it does not).
        self._at_end: set[tuple[str, int]] = set()
        # Partitions with records applied since their last end-of-partition: not at the end.
        self._behind: set[tuple[str, int]] = set()
        self._assigned: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ReplicaFollower:
        self._thread = threading.Thread(target=self._run, name="replica-follower", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    @property
    def caught_up(self) -> bool:
        """True once every followed partition has been read to its end since start."""
        return bool(self._assigned) and self._assigned <= self._at_end

    @property
    def at_end(self) -> bool:
        """True when every followed partition's last fetch found nothing more to read and
        all that came before it is applied: the store holds everything on the topics as
        of that fetch. (Counts on one topic can be complete before another topic's records
        of the same batch, say the changelog's, are applied: wait for this, not for them.)"""
        return self.caught_up and not self._behind

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _assign(self, consumer: Consumer) -> None:
        stored = self.store.offsets()
        while not self._stop.is_set():
            metadata = consumer.list_topics(timeout=10)
            missing = [t for t in FOLLOWED_TOPICS if t not in metadata.topics]
            if not missing:
                break
            log.info("waiting for topics %s", missing)
            time.sleep(0.5)
        assignment = [
            TopicPartition(topic, partition, stored.get((topic, partition), OFFSET_BEGINNING))
            for topic in FOLLOWED_TOPICS
            for partition in sorted(metadata.topics[topic].partitions)
        ]
        self._assigned = {(tp.topic, tp.partition) for tp in assignment}
        consumer.assign(assignment)

    def _fetched(self, consumer: Consumer) -> list[Message]:
        """What the client has fetched (up to a batch), without waiting when there is any;
        with none, up to `wait` for the first record, then whatever came with it.

        `consume` with a timeout waits for a full batch or the whole timeout, so a trickle
        of changes would sit in the client for that long before it is applied.
        """
        messages = consumer.consume(num_messages=self.batch_size, timeout=0)
        if messages:
            return messages
        first = consumer.poll(self.wait)
        if first is None:
            return []
        return [first, *consumer.consume(num_messages=self.batch_size - 1, timeout=0)]

    def _run(self) -> None:
        consumer = Consumer(
            client_config(
                self.bootstrap,
                **{
                    "group.id": "tessera-replica-unused",  # required by librdkafka; never committed
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "fetch.wait.max.ms": FETCH_WAIT_MS,
                    "enable.partition.eof": True,
                },
            )
        )
        try:
            self._assign(consumer)
            while not self._stop.is_set():
                messages = self._fetched(consumer)
                records = []
                # In consumed order: a partition is at its end if its last word was EOF.
                ended: dict[tuple[str, int], bool] = {}
                for message in messages:
                    error = message.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            ended[(message.topic(), message.partition())] = True
                        else:
                            self.last_error = str(error)
                            log.warning("replica consume error: %s", error)
                        continue
                    ended[(message.topic(), message.partition())] = False
                    records.append(
                        ConsumedRecord(
                            message.topic(),
                            message.partition(),
                            message.offset(),
                            message.key(),
                            message.value(),
                            tuple(message.headers() or ()),
                        )
                    )
                if records:
                    began = time.thread_time()
                    self.store.apply(records)
                    self.apply_cpu += time.thread_time() - began
                    self.applied += len(records)
                    self.applies += 1
                for position, at_end in ended.items():  # only once applied
                    if at_end:
                        self._at_end.add(position)
                        self._behind.discard(position)
                    else:
                        self._behind.add(position)
        except Exception as exc:  # surfaced on /healthz; the thread must not die silently
            self.last_error = repr(exc)
            log.exception("replica follower stopped")
            raise
        finally:
            consumer.close()
