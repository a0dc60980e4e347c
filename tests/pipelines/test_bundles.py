"""Bundles carry records to the stage owner unchanged; ingest commits never pass them."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from faust.types import TP

from pipelines import topics
from pipelines.broker import EmbeddedBroker, free_port
from pipelines.bundles import decode_bundle, encode_bundles
from pipelines.ingest import Forwarder
from pipelines.kafka import BatchProducer, DeliveryError
from pipelines.pipeline import Pipeline, SourceRecord


def test_a_bundle_keeps_bytes_keys_and_positions_exactly():
    records = [
        SourceRecord(topics.BEHAVIORAL, 3, 41, b'{"type":"page"}', b"anon-1"),
        SourceRecord(topics.CONSENT, 0, 7, b"\xff\xfe not utf-8 \x00", None),
        SourceRecord(topics.SUPPORT, 11, 2**40, None, b""),
        SourceRecord(topics.IDENTITY_COMMANDS, 0, 0, b"", b"k"),
    ]
    (bundle,) = encode_bundles(records)
    assert decode_bundle(bundle) == records


def test_bundles_are_cut_by_size_in_order_and_a_large_record_travels_alone():
    small = [SourceRecord(topics.BEHAVIORAL, 0, i, b"x" * 100) for i in range(50)]
    large = SourceRecord(topics.BEHAVIORAL, 0, 50, b"y" * 5000)
    records = [*small, large, *small[:3]]
    bundles = encode_bundles(records, max_bytes=1000)
    assert len(bundles) > 2
    decoded = [decode_bundle(b) for b in bundles]
    assert [r for bundle in decoded for r in bundle] == records  # nothing lost or reordered
    assert [large] in decoded
    assert all(len(b) <= 9 for b in decoded if large not in b)  # 116 weight each, 1000 cap


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as running:
        yield running


@pytest.mark.broker
def test_the_group_offset_never_passes_what_the_broker_acknowledged(broker):
    forwarder = Forwarder(BatchProducer(broker.bootstrap))
    p0, p1 = TP(topics.BEHAVIORAL, 0), TP(topics.BEHAVIORAL, 1)
    records = [SourceRecord(p0.topic, 0, o, b"e%d" % o) for o in range(10, 20)]
    assert forwarder.forward(records) == 1
    # Faust acked more on p0 (a batch cancelled mid-send) and something on p1 never forwarded.
    assert forwarder.committable({p0: 25, p1: 5}) == {p0: 20}
    forwarder.close()
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "bundles-test"})
    consumer.assign([TopicPartition(topics.STAGE_INPUT, 0, OFFSET_BEGINNING)])
    try:
        (message,) = consumer.consume(num_messages=10, timeout=10)
    finally:
        consumer.close()
    assert decode_bundle(message.value()) == records
    assert dict(message.headers())["tessera.forwarded_by"]


def test_a_send_the_broker_never_acknowledged_moves_no_offset():
    nobody = f"127.0.0.1:{free_port()}"
    forwarder = Forwarder(BatchProducer(nobody, **{"message.timeout.ms": 1000}))
    with pytest.raises(DeliveryError):
        forwarder.forward([SourceRecord(topics.BEHAVIORAL, 0, 0, b"e")])
    assert forwarder.committable({TP(topics.BEHAVIORAL, 0): 1}) == {}


def test_the_owner_stores_the_bundle_offset_with_the_batch_and_only_with_it(tmp_path, make_event):
    pipeline = Pipeline(tmp_path / "state.duckdb", quality=False)
    records = [
        SourceRecord(topics.BEHAVIORAL, 2, 7, orjson.dumps(make_event())),
        SourceRecord(topics.BEHAVIORAL, 2, 8, b"not json"),
    ]
    bundle = [SourceRecord(topics.STAGE_INPUT, 0, 41, None)]

    def broker_down(_outputs: list) -> None:
        raise DeliveryError("not acknowledged")

    with pytest.raises(DeliveryError):
        pipeline.process(records, broker_down, bundle)
    assert pipeline.committed_offsets() == {}  # rolled back whole: the bundle replays
    sent: list = []
    report = pipeline.process(records, sent.extend, bundle)
    assert report.received == 2 and sent
    assert pipeline.committed_offsets() == {
        (topics.BEHAVIORAL, 2): 9,  # the original positions, as a single worker stores them
        (topics.STAGE_INPUT, 0): 42,  # where the owner resumes
    }
    pipeline.close()
