"""Metrics, lag and the dead-letter routes of a running stack, and the Grafana dashboard."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipelines.worker_metrics import STAGES

pytestmark = pytest.mark.broker

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "tessera-dashboard.json"
METRIC = re.compile(r"\b(tessera_[a-z0-9_]+)")


def samples(url: str) -> dict[str, list]:
    """Sample name -> samples of one real scrape."""
    found: dict[str, list] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=30).text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def test_every_dashboard_panel_queries_metrics_a_real_scrape_exposes(scenario):
    stack = scenario.stack
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"], "the dashboard has no panels"
    scenario.wait_for(lambda: "tessera_consumer_lag" in samples(f"{stack.api_url}/metrics"))
    exposed = samples(f"{stack.api_url}/metrics") | samples(stack.worker_metrics_url)
    for panel in dashboard["panels"]:
        names = {m for t in panel["targets"] for m in METRIC.findall(t["expr"])}
        assert names, f"panel {panel['title']!r} queries no Tessera metric"
        missing = names - exposed.keys()
        assert not missing, f"panel {panel['title']!r}: {sorted(missing)} not in any scrape"


def test_api_metrics_count_what_stats_count(scenario):
    stats = scenario.get("/v1/stats").json()
    exposed = samples(f"{scenario.stack.api_url}/metrics")
    by_outcome: dict[str, float] = {}
    for sample in exposed["tessera_events_total"]:
        by_outcome[sample.labels["outcome"]] = (
            by_outcome.get(sample.labels["outcome"], 0) + sample.value
        )
    assert by_outcome["applied"] == stats["applied"] >= 3
    assert by_outcome["rejected"] == stats["rejected"] >= 1
    assert exposed["tessera_persons"][0].value == stats["persons"]
    assert exposed["tessera_store_bytes"][0].value > 0
    rows = {s.labels["table"]: s.value for s in exposed["tessera_store_rows"]}
    assert rows["identity_membership"] >= 3


def test_the_worker_times_every_stage_and_counts_outcomes(scenario):
    exposed = samples(scenario.stack.worker_metrics_url)
    counts = {s.labels["stage"]: s.value for s in exposed["tessera_stage_seconds_count"]}
    for stage in (*STAGES, "emit"):
        assert counts[stage] >= 1, f"stage {stage} was never timed"
    events = {s.labels["outcome"]: s.value for s in exposed["tessera_worker_events_total"]}
    assert events["applied"] >= 3 and events["rejected"] >= 1
    assert sum(s.value for s in exposed["tessera_batch_size_sum"]) >= 4


def test_lag_lists_every_worker_partition_and_drains_to_zero(scenario):
    def drained():
        rows = scenario.get("/v1/lag", key=None).json()["partitions"]
        worker = {(r["topic"], r["partition"]): r for r in rows if r["reader"] == "worker"}
        behavioral = worker.get(("tessera.events.behavioral", 0))
        return behavioral and behavioral["end"] >= 3 and all(r["lag"] == 0 for r in rows) and rows

    rows = scenario.wait_for(drained)
    readers = {r["reader"] for r in rows}
    assert readers == {"worker", "replica"}


def test_dead_letters_are_for_admins_and_replay_a_fix(scenario):
    assert scenario.get("/v1/dlq", key="auditor").status_code == 403
    assert scenario.get("/v1/dlq", key=None).status_code == 401
    letters = scenario.get("/v1/dlq", reason="malformed_json").json()["dead_letters"]
    garbage = [d for d in letters if d["payload_preview"] == scenario.garbage.decode()]
    assert len(garbage) == 1
    offset = garbage[0]["offset"]
    shown = scenario.get(f"/v1/dlq/{offset}").json()
    assert shown["reasons"][0]["code"] == "malformed_json"
    assert scenario.get("/v1/dlq/999999").status_code == 404
    assert scenario.post("/v1/dlq/replay", {}).status_code == 400
    before = scenario.get("/v1/stats").json()
    fixed = {
        "type": "page",
        "messageId": "console-fixed",
        "timestamp": "2026-10-01T11:00:00Z",
        "anonymousId": "dev-fixed",
        "context": {"location": {"country": "US"}},
    }
    replayed = scenario.post(
        "/v1/dlq/replay", {"offsets": [offset], "fixed": orjson.dumps(fixed).decode()}
    )
    assert replayed.status_code == 200, replayed.text
    assert replayed.json() == {"replayed": 1, "sent_per_topic": {"tessera.events.behavioral": 1}}
    after = scenario.wait_for(
        lambda: (s := scenario.get("/v1/stats").json())["applied"] == before["applied"] + 1 and s
    )
    assert after["rejected"] == before["rejected"]
