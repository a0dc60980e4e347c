"""The audit API on a real stack (broker, worker process, API process with its replica):
roles, verify on the replica (and after tampering with it), timelines, provenance, exports."""

from __future__ import annotations

import io
from typing import Any

import duckdb
import httpx
import orjson
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from consent.audit import EXPORT_SCHEMA, broken_export_rows
from pipelines.cli import app
from pipelines.demo import wait_until_processed
from pipelines.produce import produce_events

pytestmark = pytest.mark.broker

ENDPOINTS = (
    "/v1/audit/verify",
    "/v1/audit/subjects/user_id:u1",
    "/v1/audit/profiles/{person}/attributes/plan",
    "/v1/audit/export?format=csv",
)


@pytest.fixture(scope="module")
def audited(stack, events) -> dict[str, Any]:
    """Three phases, each processed before the next, so the order of decisions is fixed:
    grant and events; a withdrawal and an out-of-order pair; an event after the withdrawal."""
    phases = [
        [
            events.consent("analytics", "granted", 0, policyVersion="v7", jurisdiction="EU"),
            events.identify(5, {"first_name": "Ada", "email": "ada@example.org"}),
            events.page(6, {"plan": "pro"}),
        ],
        [
            events.consent("analytics", "withdrawn", 60),
            events.consent("personalization", "denied", 50),
            events.consent("personalization", "granted", 40),  # made earlier, arrives later
        ],
        [events.page(70, {"plan": "enterprise"})],
    ]
    sent = 0
    for phase in phases:
        produce_events([orjson.dumps(e) for e in phase], stack.bootstrap)
        sent += len(phase)
        wait_until_processed(stack.api_url, sent, timeout=300)
    return {"events": [e for phase in phases for e in phase]}


def get(stack, path: str, key: str | None = "auditor", **params: Any) -> httpx.Response:
    headers = {"X-API-Key": stack.keys[key]} if key else {}
    return httpx.get(f"{stack.api_url}{path}", params=params, headers=headers, timeout=30)


def _person(stack) -> str:
    return get(stack, "/v1/audit/subjects/user_id:u1").json()["subject"]["person_id"]


def test_only_auditors_and_admins_may_audit(stack, audited):
    person = _person(stack)
    for template in ENDPOINTS:
        path = template.format(person=person)
        assert get(stack, path, key=None).status_code == 401, path
        bad = httpx.get(f"{stack.api_url}{path}", headers={"X-API-Key": "tsk_nope"})
        assert bad.status_code == 401, path
        forbidden = get(stack, path, key="web")  # a personalization reader
        assert forbidden.status_code == 403 and forbidden.json()["error"] == "forbidden", path
        assert get(stack, path, key="auditor").status_code == 200, path
        assert get(stack, path, key="admin").status_code == 200, path


def test_verify_runs_on_the_replica(stack, audited):
    report = get(stack, "/v1/audit/verify").json()
    assert report["ok"] is True
    assert report["entries"] == len(audited["events"])
    assert report["replica_caught_up"] is True


def test_the_timeline_over_http_shows_withdrawal_then_withheld(stack, audited):
    body = get(stack, "/v1/audit/subjects/user_id:u1").json()
    rows = body["timeline"]
    withdrawal = next(r for r in rows if r["outcome"] == "withdrawn")
    withheld = [r for r in rows if r["outcome"] == "withheld"]
    assert len(withheld) == 1 and withheld[0]["kind"] == "page"
    assert withheld[0]["detail"]["consent_ref"] == withdrawal["event_key"]
    assert rows.index(withheld[0]) > rows.index(withdrawal)
    late = next(r for r in rows if r["purpose"] == "personalization" and r["outcome"] == "granted")
    assert late["detail"]["arrived_out_of_order"] is True and not late["detail"]["in_force"]
    assert body["current_consent"]["personalization"]["status"] == "denied"
    # The same subject by another identifier of the person: the same timeline.
    by_email = get(stack, "/v1/audit/subjects/email:ADA@example.org").json()
    assert by_email["timeline"] == rows
    assert get(stack, "/v1/audit/subjects/user_id:nobody").status_code == 404
    assert get(stack, "/v1/audit/subjects/shoe:9").json()["error"] == "invalid_subject"


def test_attribute_provenance_over_http(stack, audited):
    person = _person(stack)
    body = get(stack, f"/v1/audit/profiles/{person}/attributes/plan").json()
    (event,) = body["events"]  # the withheld page produced nothing
    assert event["kind"] == "page" and event["decision"] == "applied"
    assert event["consent"]["status"] == "granted" and event["consent"]["policy_version"] == "v7"
    assert event["consent"]["source"] == "cmp-one"
    missing = get(stack, f"/v1/audit/profiles/{person}/attributes/shoe_size")
    assert missing.status_code == 404


def test_exports_over_http_round_trip(stack, audited):
    timeline = get(stack, "/v1/audit/subjects/user_id:u1").json()["timeline"]
    hashes = {r["detail"]["hash"] for r in timeline if r["category"] == "decision"}
    parquet = pq.read_table(io.BytesIO(get(stack, "/v1/audit/export", format="parquet").content))
    csv = pa_csv.read_csv(
        io.BytesIO(get(stack, "/v1/audit/export", format="csv").content),
        convert_options=pa_csv.ConvertOptions(column_types=EXPORT_SCHEMA),
    )
    for table in (parquet, csv):
        assert table.num_rows == len(audited["events"])
        assert table.column("seq").to_pylist() == list(range(1, table.num_rows + 1))
        assert hashes <= set(table.column("hash").to_pylist())
        assert broken_export_rows(table) == []
    assert csv.column("hash").to_pylist() == parquet.column("hash").to_pylist()
    assert get(stack, "/v1/audit/export", format="xml").status_code == 400


def test_the_audit_routes_are_described_in_openapi(stack, audited):
    spec = httpx.get(f"{stack.api_url}/openapi.json").json()
    subject = spec["paths"]["/v1/audit/subjects/{subject}"]["get"]["responses"]["200"]
    assert subject["content"]["application/json"]["schema"]["$ref"].endswith("SubjectTimeline")
    assert "TimelineRow" in spec["components"]["schemas"]
    assert "/v1/audit/profiles/{person_id}/attributes/{name}" in spec["paths"]


def test_tampering_with_the_replica_is_named_by_the_api_and_the_cli(stack, audited):
    """Last in the module: it stops the API, edits one row of its replica file, restarts it."""
    replica = stack.data_dir / "api" / "profiles.duckdb"
    stack.stop_process("api")
    conn = duckdb.connect(str(replica))
    seq, key, entry = conn.execute(
        "SELECT seq, event_key, entry FROM lineage WHERE entry->>'decision' = 'withheld'"
    ).fetchone()
    forged = orjson.loads(entry) | {"decision": "allowed"}  # hide a withholding
    conn.execute("UPDATE lineage SET entry = ? WHERE seq = ?", [orjson.dumps(forged).decode(), seq])
    conn.close()

    result = CliRunner().invoke(app, ["audit", "verify", "--store", str(replica), "--json"])
    assert result.exit_code == 1
    assert orjson.loads(result.output)["first_broken_seq"] == seq

    stack.start_api()  # resumes from its stored offsets: the forged row stays
    report = get(stack, "/v1/audit/verify").json()
    assert report["ok"] is False
    assert (report["first_broken_seq"], report["event_key"]) == (seq, key)
    assert report["problem"] == "content does not match its hash"
    result = CliRunner().invoke(
        app,
        ["audit", "verify", "--api", stack.api_url, "--api-key", stack.keys["auditor"]],
    )
    assert result.exit_code == 1 and f"seq {seq}" in result.output
