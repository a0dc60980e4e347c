import faust
import pytest

from pipelines.kafka import client_config, faust_credentials


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
