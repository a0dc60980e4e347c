import asyncio
import inspect
import logging

import faust
import pytest
from aiokafka import AIOKafkaConsumer

from pipelines import topics
from pipelines.broker import free_port
from pipelines.faust_engine import FETCH_WAIT_MS, TesseraApp, TesseraWorker, faust_app
from pipelines.flink_launch import FlinkUnavailable, flink_python, run_in_flink_python
from pipelines.ingest import IngestApp
from pipelines.kafka import (
    BatchProducer,
    DeliveryError,
    client_config,
    faust_credentials,
    java_client_properties,
)
from pipelines.pipeline import OutRecord


def test_plaintext_by_default(monkeypatch):
    for name in ("PROTOCOL", "MECHANISM", "USERNAME", "PASSWORD"):
        monkeypatch.delenv(f"TESSERA_KAFKA_SASL_{name}", raising=False)
    monkeypatch.delenv("TESSERA_KAFKA_SECURITY_PROTOCOL", raising=False)
    assert client_config("k:9092") == {"bootstrap.servers": "k:9092"}
    assert faust_credentials() is None


def test_sasl_settings_reach_both_clients(monkeypatch):
    monkeypatch.setenv("TESSERA_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("TESSERA_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("TESSERA_KAFKA_SASL_USERNAME", "tessera")
    monkeypatch.setenv("TESSERA_KAFKA_SASL_PASSWORD", "s3cret")
    config = client_config("k:9093")
    assert config["security.protocol"] == "SASL_SSL"
    assert config["sasl.mechanism"] == "SCRAM-SHA-512"
    credentials = faust_credentials()
    assert isinstance(credentials, faust.SASLCredentials)
    assert (credentials.username, credentials.password) == ("tessera", "s3cret")
    assert credentials.ssl_context is not None


def test_unknown_protocol_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TESSERA_KAFKA_SECURITY_PROTOCOL", "CARRIER_PIGEON")
    with pytest.raises(ValueError, match="CARRIER_PIGEON"):
        faust_credentials()


def test_the_java_client_gets_the_same_security_settings():
    env = {
        "TESSERA_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
        "TESSERA_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "TESSERA_KAFKA_SASL_USERNAME": "tessera",
        "TESSERA_KAFKA_SASL_PASSWORD": 'pa"ss',
        "TESSERA_KAFKA_SSL_CAFILE": "/etc/tessera/kafka-ca/ca.crt",
    }
    props = java_client_properties(env)
    assert props["security.protocol"] == "SASL_SSL"
    assert props["sasl.mechanism"] == "SCRAM-SHA-512"
    assert props["sasl.jaas.config"] == (
        "org.apache.kafka.common.security.scram.ScramLoginModule required "
        'username="tessera" password="pa\\"ss";'
    )
    assert (props["ssl.truststore.type"], props["ssl.truststore.location"]) == (
        "PEM",
        "/etc/tessera/kafka-ca/ca.crt",
    )
    assert java_client_properties({}) == {}
    with pytest.raises(ValueError, match="GSSAPI"):
        java_client_properties(
            {
                "TESSERA_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "TESSERA_KAFKA_SASL_MECHANISM": "GSSAPI",
            }
        )


def test_the_flink_engine_without_its_venv_says_how_to_build_it(tmp_path):
    # The core venv has no PyFlink; an empty root has no .venv-flink.
    assert flink_python(tmp_path) is None
    with pytest.raises(FlinkUnavailable, match="make flink-setup"):
        run_in_flink_python(["worker", "--engine", "flink"], root=tmp_path)


@pytest.mark.parametrize("app_class", [TesseraApp, IngestApp])
def test_worker_fetches_wait_at_most_the_short_fetch_wait(tmp_path, app_class):
    # Faust asks aiokafka for 1,500 ms and passes no setting for it; the short wait is set on
    # the attribute aiokafka hands to its fetcher when the consumer starts. If an upgrade
    # renames either, this fails instead of freshness silently growing by a second.
    async def worker_consumer_wait() -> int:
        app, _ = faust_app("127.0.0.1:9", tmp_path, "fetch-wait", 100, app_class=app_class)
        thread = app.consumer._new_consumer_thread()
        consumer = thread._create_worker_consumer(app.transport)
        try:
            return consumer._fetch_max_wait_ms
        finally:
            await consumer.stop()

    assert asyncio.run(worker_consumer_wait()) == FETCH_WAIT_MS < 1500
    assert "fetch_max_wait_ms=self._fetch_max_wait_ms" in inspect.getsource(AIOKafkaConsumer.start)


def test_the_worker_leaves_the_root_logger_at_its_level(tmp_path):
    # Faust's worker sets the root logger to DEBUG (for its startup spinner) and filters at
    # the handler, so every debug call of aiokafka and mode would build a record to drop.
    app, _ = faust_app("127.0.0.1:9", tmp_path, "log-level", 100)
    root = logging.getLogger()
    saved = root.level, root.handlers[:]
    try:
        for worker_class, debug in ((faust.Worker, True), (TesseraWorker, False)):
            worker_class(app, loglevel="warn", quiet=True)._setup_logging()
            assert logging.getLogger("aiokafka").isEnabledFor(logging.DEBUG) is debug
            assert logging.getLogger("aiokafka").isEnabledFor(logging.WARNING)
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]


def test_records_the_broker_never_acknowledges_fail_the_send():
    # Delivery reports come only for failures: those must still reach the batch.
    producer = BatchProducer(f"127.0.0.1:{free_port()}", **{"message.timeout.ms": 300})
    records = [OutRecord(topics.LINEAGE, f"k{i}".encode(), b"v") for i in range(3)]
    with pytest.raises(DeliveryError, match="3 records failed"):
        producer.send(records, timeout=30)
