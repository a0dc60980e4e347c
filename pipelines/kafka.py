"""Kafka client settings and the batch producer every engine uses for its outputs."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from confluent_kafka import KafkaError, Producer

from pipelines.pipeline import OutRecord

# Security settings pass through from the environment, so production (SASL/TLS) needs no code.
_SECURITY_ENV = {
    "TESSERA_KAFKA_SECURITY_PROTOCOL": "security.protocol",
    "TESSERA_KAFKA_SASL_MECHANISM": "sasl.mechanism",
    "TESSERA_KAFKA_SASL_USERNAME": "sasl.username",
    "TESSERA_KAFKA_SASL_PASSWORD": "sasl.password",
    "TESSERA_KAFKA_SSL_CAFILE": "ssl.ca.location",
}


def client_config(bootstrap: str, **extra: Any) -> dict[str, Any]:
    """librdkafka settings for `bootstrap` plus any TESSERA_KAFKA_* security settings."""
    config: dict[str, Any] = {"bootstrap.servers": bootstrap}
    for env, key in _SECURITY_ENV.items():
        if os.environ.get(env):
            config[key] = os.environ[env]
    config.update(extra)
    return config


def faust_credentials() -> Any:
    """The same TESSERA_KAFKA_* security settings as Faust (aiokafka) credentials, or None."""
    import ssl

    import faust

    env = os.environ
    protocol = env.get("TESSERA_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT").upper()
    if protocol == "PLAINTEXT":
        return None
    context = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=env.get("TESSERA_KAFKA_SSL_CAFILE") or None)
    if protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=env.get("TESSERA_KAFKA_SASL_USERNAME"),
            password=env.get("TESSERA_KAFKA_SASL_PASSWORD"),
            mechanism=env.get("TESSERA_KAFKA_SASL_MECHANISM", "PLAIN"),
            ssl_context=context,
        )
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    raise ValueError(
        f"TESSERA_KAFKA_SECURITY_PROTOCOL={protocol!r} is not one of "
        "PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"
    )


# Kafka security for the Java client, from the same TESSERA_KAFKA_* variables as librdkafka.
_JAAS_MODULES = {
    "PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
    "SCRAM-SHA-256": "org.apache.kafka.common.security.scram.ScramLoginModule",
    "SCRAM-SHA-512": "org.apache.kafka.common.security.scram.ScramLoginModule",
}


def java_client_properties(env: dict[str, str] | None = None) -> dict[str, str]:
    """The same TESSERA_KAFKA_* security settings for Kafka's Java client (Flink's connector).

    In: an environment (default os.environ). Out: client properties (empty for PLAINTEXT).
    """
    env = dict(os.environ if env is None else env)
    protocol = env.get("TESSERA_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT").upper()
    if protocol == "PLAINTEXT":
        return {}
    props = {"security.protocol": protocol}
    if protocol.startswith("SASL"):
        mechanism = env.get("TESSERA_KAFKA_SASL_MECHANISM", "PLAIN").upper()
        if mechanism not in _JAAS_MODULES:
            raise ValueError(f"TESSERA_KAFKA_SASL_MECHANISM={mechanism!r} is not supported")
        user = env.get("TESSERA_KAFKA_SASL_USERNAME", "").replace('"', '\\"')
        password = env.get("TESSERA_KAFKA_SASL_PASSWORD", "").replace('"', '\\"')
        props["sasl.mechanism"] = mechanism
        props["sasl.jaas.config"] = (
            f'{_JAAS_MODULES[mechanism]} required username="{user}" password="{password}";'
        )
    if protocol in ("SSL", "SASL_SSL") and env.get("TESSERA_KAFKA_SSL_CAFILE"):
        props["ssl.truststore.type"] = "PEM"
        props["ssl.truststore.location"] = env["TESSERA_KAFKA_SSL_CAFILE"]
    return props


class DeliveryError(RuntimeError):
    """Some outputs were not acknowledged by the broker; the batch must not commit."""


# For the pipeline's outputs, which only librdkafka clients read (the API's replica, the
# changelog consumer, the tools): lz4 batches halve the broker's CPU for them and the wait
# for its acknowledgement (measured). Not for everything: aiokafka (Faust) reads the input
# topics and the stage bundles, and its lz4 codec needs a package this project lacks.
OUTPUT_SETTINGS: dict[str, Any] = {"compression.type": "lz4"}


class BatchProducer:
    """Produces a batch of records and returns only once the broker has acknowledged all.

    One `send` at a time per producer: a failure is reported to whichever call is flushing.
    """

    def __init__(self, bootstrap: str, **extra: Any) -> None:
        self._failures: list[KafkaError] = []
        self._producer = Producer(
            client_config(
                bootstrap,
                **{
                    "enable.idempotence": True,
                    "linger.ms": 5,
                    "message.max.bytes": 4 * 1024 * 1024,
                    # Delivery reports only for failures: a delivered record costs no Python
                    # call (a batch of 10,000 events makes ~13,000 outputs).
                    "delivery.report.only.error": True,
                    # One callback for the producer, not one passed with every record: a
                    # per-record callback costs librdkafka's client ~0.3 us a record to hold.
                    "on_delivery": self._on_failure,
                    **extra,
                },
            )
        )

    def _on_failure(self, err: KafkaError | None, _msg: Any) -> None:
        self._failures.append(err)  # type: ignore[arg-type]

    def send(self, records: Iterable[OutRecord], timeout: float = 60) -> int:
        """Produce and flush. Out: how many were sent. Raises DeliveryError on any failure."""
        # Left over only from a send that gave up waiting (and raised): not this batch's.
        errors = self._failures
        errors.clear()
        produce = self._producer.produce
        count = 0
        for record in records:
            headers = record.headers
            while True:
                try:
                    if headers:
                        produce(record.topic, record.value, record.key, headers=list(headers))
                    else:
                        produce(record.topic, record.value, record.key)
                    break
                except BufferError:
                    self._producer.poll(0.1)  # local queue full: wait for deliveries
            count += 1
        remaining = self._producer.flush(timeout)
        if remaining:
            raise DeliveryError(f"{remaining} records not delivered within {timeout} s")
        if errors:
            raise DeliveryError(f"{len(errors)} records failed: {errors[0]}")
        return count

    def close(self) -> None:
        self._producer.flush(10)


def read_topic(
    bootstrap: str, topic: str, timeout: float = 30
) -> list[tuple[int, int, bytes | None, bytes | None, list[tuple[str, bytes]]]]:
    """Every record of a topic from offset zero to its end: (partition, offset, key, value,
    headers). The end is each partition's fetch high-water mark (partition EOF); `timeout`
    bounds a wait in which nothing arrives."""
    return [
        (m.partition(), m.offset(), m.key(), m.value(), list(m.headers() or ()))
        for m in topic_messages(bootstrap, topic, timeout)
    ]


def topic_messages(bootstrap: str, topic: str, timeout: float = 30) -> list[Any]:
    """Every message of a topic from offset zero to its end, as confluent-kafka `Message`s
    (their timestamps included), in the order consumed; see `read_topic`."""
    import time

    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(
        client_config(
            bootstrap,
            **{
                "group.id": "tessera-topic-reader",  # never committed: each read is whole
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            },
        )
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = sorted(metadata.topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        found = []
        at_end: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(at_end) < len(partitions):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: no end of partitions {set(partitions) - at_end}")
            messages = consumer.consume(num_messages=5000, timeout=1)
            if messages:
                deadline = time.monotonic() + timeout
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        at_end.add(message.partition())
                    continue
                found.append(message)
        return found
    finally:
        consumer.close()
