import faust
import pytest

from pipelines.flink_launch import FlinkUnavailable, flink_python, run_in_flink_python
from pipelines.kafka import client_config, faust_credentials, java_client_properties


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
