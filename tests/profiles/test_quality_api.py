"""GET /v1/quality: rejections per bucket, source and reason, and alerts, from output topics."""

from __future__ import annotations

import threading
import time

import httpx
import orjson
import uvicorn

from pipelines import topics
from pipelines.broker import free_port
from profiles.api import create_app
from profiles.store import ConsumedRecord, ProfileStore


def test_quality_counts_and_alerts_come_from_dead_letters_and_quality_reports(
    tmp_path, run, make_event
):
    pages = [make_event("page", userId=f"u{i}") for i in range(6)]  # no anonymousId: an alert
    run.feed(*pages, b"{broken", make_event("page", timestamp="1970-01-01T00:00:00Z"))
    order = make_event(
        "track",
        event="Order Completed",
        userId="u1",
        properties={"order_id": "o1", "total": 5, "currency": "ZZZ"},
    )
    run.feed(order, topic=topics.TRANSACTIONAL)
    store = ProfileStore(tmp_path / "replica.duckdb")
    records = [
        ConsumedRecord(o.topic, 0, n, o.key, o.value, o.headers) for n, o in enumerate(run.outputs)
    ]
    store.apply(records)
    store.apply(records)  # a replica re-reading its topics counts nothing twice
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(store), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.02)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    body = client.get("/v1/quality", params={"bucket": "minute"}).json()
    assert body["rejected_by_reason"] == {
        "malformed_json": 1,
        "timestamp_too_old": 1,
        "unknown_currency": 1,
    }
    assert body["rejected_by_topic"] == {topics.BEHAVIORAL: 2, topics.TRANSACTIONAL: 1}
    assert sum(b["count"] for b in body["rejections"]) == 3
    assert all(b["bucket"] and b["bucket"].endswith(":00+00:00") for b in body["rejections"])
    assert body["batches_checked"] == 2
    assert body["rows_checked_by_source"] == {"behavioral": 7, "transactional": 1}
    assert body["alerts_by_check"] == {"behavioral/has_anonymous_id": 1}
    (alert,) = body["recent_alerts"]
    # The suite judged 7 rows; only the (rejected) 1970 page carried an anonymousId.
    assert (alert["suite"], alert["observed"], alert["threshold"]) == ("behavioral", 0.1429, 0.8)
    assert client.get("/v1/quality", params={"bucket": "week"}).status_code == 400
    assert orjson.loads(run.on(topics.QUALITY_REPORTS)[0].value)["alerts"]
    server.should_exit = True
    thread.join(5)
    store.close()
