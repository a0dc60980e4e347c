"""Operator routes and the console's files over a real socket, on an API with no broker."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from pipelines.broker import free_port
from profiles.access import load_keyring, write_keyring
from profiles.api import create_app
from profiles.store import ProfileStore

KEYS = [
    {"name": "ops", "role": "admin"},
    {"name": "audit", "role": "auditor"},
    {"name": "web", "role": "reader", "purposes": ["personalization"]},
]


@pytest.fixture
def api(tmp_path) -> Iterator[tuple[str, dict[str, str]]]:
    store = ProfileStore(tmp_path / "replica.duckdb")
    keys = write_keyring(tmp_path / "keys.yaml", KEYS)
    app = create_app(store, keyring=load_keyring(tmp_path / "keys.yaml"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", keys
    server.should_exit = True
    thread.join(5)
    store.close()


def test_whoami_tells_each_role_what_it_may_do(api):
    url, keys = api
    answers = {
        name: httpx.get(f"{url}/v1/whoami", headers={"X-API-Key": secret}).json()
        for name, secret in keys.items()
    }
    assert answers["ops"]["may"] == {"read_profiles": True, "audit": True, "administer": True}
    assert "subject_access" in answers["ops"]["readable_purposes"]
    assert answers["audit"]["may"] == {"read_profiles": False, "audit": True, "administer": False}
    assert answers["audit"]["readable_purposes"] == []
    assert answers["web"]["readable_purposes"] == ["personalization"]
    assert answers["web"]["identifier_types"] == ["user_id", "anonymous_id", "email", "phone"]
    assert httpx.get(f"{url}/v1/whoami").status_code == 401
    assert httpx.get(f"{url}/v1/whoami", headers={"X-API-Key": "tsk_wrong"}).status_code == 401


def test_dead_letters_need_an_admin_and_a_broker(api):
    url, keys = api
    as_reader = httpx.get(f"{url}/v1/dlq", headers={"X-API-Key": keys["web"]})
    assert as_reader.status_code == 403
    as_admin = httpx.get(f"{url}/v1/dlq", headers={"X-API-Key": keys["ops"]})
    assert as_admin.status_code == 503 and as_admin.json()["error"] == "no_broker"
    replay = httpx.post(
        f"{url}/v1/dlq/replay", json={"offsets": [1]}, headers={"X-API-Key": keys["audit"]}
    )
    assert replay.status_code == 403


def test_metrics_of_an_empty_replica_and_no_lag_without_a_broker(api):
    url, _ = api
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    assert families["tessera_persons"].samples[0].value == 0
    assert families["tessera_store_bytes"].samples[0].value > 0  # the file exists
    assert "tessera_consumer_lag" not in families
    assert httpx.get(f"{url}/v1/lag").json() == {"partitions": [], "error": "no broker configured"}


def test_the_console_is_served_with_its_script_and_styles(api):
    url, _ = api
    redirect = httpx.get(f"{url}/console")
    assert redirect.status_code == 307 and redirect.headers["location"] == "/console/"
    page = httpx.get(f"{url}/console/")
    assert page.status_code == 200 and 'id="api-key"' in page.text
    for asset, kind in (("console.js", "javascript"), ("console.css", "css")):
        served = httpx.get(f"{url}/console/{asset}")
        assert served.status_code == 200 and kind in served.headers["content-type"]
    assert httpx.get(f"{url}/console/missing.js").status_code == 404
