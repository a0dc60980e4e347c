"""Audits on real DuckDB files: verify (and tampering), subject timelines, attribute
provenance, exports; through `tessera audit` and the audit classes."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from consent.audit import (
    EXPORT_SCHEMA,
    Audit,
    broken_export_rows,
    parse_subject,
    resolve_statements,
)
from consent.ledger import verify_chain
from pipelines import topics
from pipelines.cli import app
from pipelines.pipeline import Pipeline, SourceRecord
from profiles.store import ConsumedRecord, ProfileStore

runner = CliRunner()


class Run:
    """A worker's pipeline on a state file, and an API replica file fed its outputs."""

    def __init__(self, tmp_path: Path) -> None:
        self.state = tmp_path / "state.duckdb"
        self.replica = tmp_path / "replica.duckdb"
        self.pipeline = Pipeline(self.state, quality=False)
        self.outputs: list = []
        self.offsets = itertools.count()

    def feed(self, *events: dict[str, Any]) -> None:
        for event in events:
            topic = topics.CONSENT if event["type"] == "consent" else topics.BEHAVIORAL
            record = SourceRecord(topic, 0, next(self.offsets), orjson.dumps(event))
            self.pipeline.process([record], self.outputs.extend)

    def finish(self) -> None:
        """Close the worker state and materialise every output in the replica file."""
        self.pipeline.close()
        store = ProfileStore(self.replica)
        store.apply(
            [
                ConsumedRecord(o.topic, 0, n, o.key, o.value, o.headers)
                for n, o in enumerate(self.outputs)
            ]
        )
        store.close()

    def audit(self) -> Any:
        store = ProfileStore(self.replica, read_only=True)
        self._opened = store
        return Audit(store.conn, store)

    def ledger(self, path: Path) -> list[tuple]:
        conn = duckdb.connect(str(path), read_only=True)
        try:
            return conn.execute("SELECT seq, event_key, hash FROM lineage ORDER BY seq").fetchall()
        finally:
            conn.close()


@pytest.fixture
def history(tmp_path, events):
    """An EU subject: analytics granted, two pages and an identify applied, a withdrawal, then a
    page withheld; a grant for personalization that arrives after a later denial."""
    run = Run(tmp_path)
    run.feed(
        events.consent("analytics", "granted", 0, policyVersion="v7", jurisdiction="EU"),
        events.identify(5, {"first_name": "Ada", "email": "ada@example.org"}),
        events.page(6, {"plan": "pro"}),
        events.page(7, {"plan": "team"}),
        events.consent("personalization", "denied", 50),
        events.consent("personalization", "granted", 40, policyVersion="v7"),  # out of order
        events.consent("analytics", "withdrawn", 60),
        events.page(70, {"plan": "enterprise"}),
    )
    run.finish()
    yield run
    if hasattr(run, "_opened"):
        run._opened.close()


def _cli(*args: str) -> Any:
    return runner.invoke(app, ["audit", *args])


def test_worker_and_replica_keep_the_same_chain(history):
    worker, replica = history.ledger(history.state), history.ledger(history.replica)
    assert len(worker) == 8 and worker == replica
    for path in (history.state, history.replica):
        result = _cli("verify", "--store", str(path))
        assert result.exit_code == 0, result.output
        assert "intact" in result.output and "8 entries" in result.output


@pytest.mark.parametrize("which", ["state", "replica"])
def test_tampering_one_row_fails_verify_and_names_exactly_that_row(history, which):
    path = getattr(history, which)
    seq, key, _ = history.ledger(path)[3]
    conn = duckdb.connect(str(path))
    (entry,) = conn.execute("SELECT entry FROM lineage WHERE seq = ?", [seq]).fetchone()
    doc = orjson.loads(entry)
    doc["decision"] = "withheld"  # rewrite history: an applied page becomes withheld
    conn.execute("UPDATE lineage SET entry = ? WHERE seq = ?", [orjson.dumps(doc).decode(), seq])
    conn.close()

    result = _cli("verify", "--store", str(path))
    assert result.exit_code == 1
    assert f"seq {seq}" in result.output and key in result.output
    report = orjson.loads(_cli("verify", "--store", str(path), "--json").output)
    assert report["ok"] is False
    assert (report["first_broken_seq"], report["event_key"]) == (seq, key)
    assert report["problem"] == "content does not match its hash"
    assert report["entries"] == seq  # nothing after the first broken entry is trusted


def test_a_recomputed_hash_still_breaks_the_link_to_the_next_entry(history):
    """Tampering that also rewrites the row's own hash is caught at the following row."""
    from consent.ledger import entry_hash

    rows = history.ledger(history.state)
    seq = rows[2][0]
    conn = duckdb.connect(str(history.state))
    entry, prev = conn.execute(
        "SELECT entry, prev_hash FROM lineage WHERE seq = ?", [seq]
    ).fetchone()
    doc = orjson.loads(entry) | {"purpose": "support"}
    conn.execute(
        "UPDATE lineage SET entry = ?, hash = ? WHERE seq = ?",
        [orjson.dumps(doc).decode(), entry_hash(prev, doc), seq],
    )
    result = verify_chain(conn)
    conn.close()
    assert not result.ok
    assert (result.first_broken_seq, result.event_key) == (rows[3][0], rows[3][1])
    assert "prev_hash" in result.problem


def test_withdrawal_then_the_timeline_shows_it_and_the_later_withheld_decision(history):
    timeline = history.audit().subject(parse_subject("user_id:u1"))
    rows = timeline["timeline"]
    analytics = [r for r in rows if r["category"] == "consent" and r["purpose"] == "analytics"]
    assert [r["outcome"] for r in analytics] == ["granted", "withdrawn"]
    grant, withdrawal = analytics
    assert grant["detail"]["source"] == "cmp-one"
    assert grant["detail"]["policy_version"] == "v7" and grant["detail"]["jurisdiction"] == "EU"
    assert grant["detail"]["superseded_by"] == withdrawal["event_key"]
    assert withdrawal["detail"]["in_force"] is True
    assert timeline["current_consent"]["analytics"]["status"] == "withdrawn"

    pages = [r for r in rows if r["category"] == "decision" and r["kind"] == "page"]
    assert [p["outcome"] for p in pages] == ["applied", "applied", "withheld"]
    assert all(p["purpose"] == "analytics" for p in pages)
    assert pages[0]["detail"]["consent_ref"] == grant["event_key"]
    withheld = pages[2]
    assert withheld["detail"]["basis"] == "stored-consent"
    assert withheld["detail"]["consent_ref"] == withdrawal["event_key"]
    assert rows.index(withheld) > rows.index(withdrawal)
    assert timeline["counts"] == {
        "consent": 4,
        "applied": 3,
        "withheld": 1,
        "identity": 1,
        "erasure": 0,
    }
    created = [r for r in rows if r["category"] == "identity"]
    assert [r["kind"] for r in created] == ["person_created"]
    assert created[0]["detail"]["person_id"] == timeline["subject"]["person_id"]


def test_out_of_order_consent_is_shown_resolved_by_its_timestamp(history):
    timeline = history.audit().subject(parse_subject("email:ADA@example.org"))
    personalization = [
        r
        for r in timeline["timeline"]
        if r["category"] == "consent" and r["purpose"] == "personalization"
    ]
    # The grant (made at 08:40) arrived after the denial (made at 08:50): it is listed
    # first, flagged as late, and the denial is what holds.
    assert [r["outcome"] for r in personalization] == ["granted", "denied"]
    grant, denial = personalization
    assert grant["seq"] > denial["seq"]
    assert grant["detail"]["arrived_out_of_order"] is True
    assert grant["detail"]["in_force"] is False
    assert grant["detail"]["superseded_by"] == denial["event_key"]
    assert denial["detail"]["arrived_out_of_order"] is False
    assert timeline["current_consent"]["personalization"]["event_key"] == denial["event_key"]
    assert timeline["current_consent"]["personalization"]["status"] == "denied"


def test_resolution_matches_the_gate_on_a_tie_and_a_late_restatement(events):
    at = events.at
    records = [
        {"seq": 1, "event_key": "a", "event_ts": at(10), "statements": [_st("granted")]},
        {"seq": 2, "event_key": "b", "event_ts": at(30), "statements": [_st("withdrawn")]},
        {"seq": 3, "event_key": "c", "event_ts": at(20), "statements": [_st("granted")]},
        {"seq": 4, "event_key": "d", "event_ts": at(30), "statements": [_st("granted")]},
    ]
    resolved = resolve_statements(records)
    assert [s["event_key"] for s in resolved] == ["a", "c", "b", "d"]
    assert [s["arrived_out_of_order"] for s in resolved] == [False, True, False, False]
    assert [s["in_force"] for s in resolved] == [False, False, False, True]


def _st(status: str) -> dict[str, Any]:
    return {
        "purpose": "marketing",
        "status": status,
        "source": "cmp",
        "policy_version": None,
        "jurisdiction": None,
    }


def test_attribute_provenance_names_the_producing_events_and_their_consent(history):
    audit = history.audit()
    person = audit.subject(parse_subject("user_id:u1"))["subject"]["person_id"]
    provenance = audit.attribute(person, "plan")
    keys = {r["event_key"]: r for r in provenance["events"]}
    pages = [
        r["event_key"]
        for r in audit.subject(parse_subject("user_id:u1"))["timeline"]
        if r["kind"] == "page" and r["outcome"] == "applied"
    ]
    # Both applied pages stated the plan; the withheld one produced nothing.
    assert list(keys) == pages
    grant = keys[pages[0]]["consent"]
    assert grant["status"] == "granted" and grant["source"] == "cmp-one"
    assert grant["policy_version"] == "v7" and grant["purpose"] == "analytics"
    assert all(e["policy_version"] == "2026-11" for e in provenance["events"])
    views = {v["purpose"]: v for v in provenance["views"]}
    # Held (subject access) from the latest page; gone from analytics after the withdrawal.
    assert views["subject_access"]["present"] is True
    assert views["subject_access"]["source_event"] == pages[1]
    assert views["subject_access"]["admitted"]["basis"] == "stored-consent"
    assert views["analytics"]["present"] is False
    assert views["analytics"]["consent_in_force"]["status"] == "withdrawn"
    assert keys[pages[1]]["source_of"] == ["subject_access"]

    name = audit.attribute(person, "first_name")
    (event,) = name["events"]
    assert event["kind"] == "identify" and event["basis"] == "no-consent-needed"
    count = audit.attribute(person, "event_count")
    assert count["computed"] is True
    assert {e["kind"] for e in count["events"]} == {"identify", "page"}
    assert audit.attribute(person, "shoe_size") is None
    assert audit.attribute("p_nobody", "plan") is None


def test_the_cli_prints_the_timeline_and_the_provenance(history):
    result = _cli("subject", "--identifier", "user_id:u1", "--store", str(history.replica))
    assert result.exit_code == 0, result.output
    assert "withdrawn" in result.output and "withheld" in result.output
    body = orjson.loads(
        _cli(
            "subject", "--identifier", "user_id:u1", "--store", str(history.replica), "--json"
        ).output
    )
    person = body["subject"]["person_id"]
    result = _cli("attribute", person, "plan", "--store", str(history.replica), "--json")
    assert result.exit_code == 0, result.output
    assert len(orjson.loads(result.output)["events"]) == 2
    unknown = _cli("subject", "--identifier", "user_id:nobody", "--store", str(history.replica))
    assert unknown.exit_code == 1 and "nothing" in unknown.output
    bad = _cli("subject", "--identifier", "shoe:9", "--store", str(history.replica))
    assert bad.exit_code == 2 and "identifier type" in bad.output
    # A worker's state has the ledger but no profiles: provenance says so.
    state = _cli("attribute", person, "plan", "--store", str(history.state))
    assert state.exit_code == 2 and "replica" in state.output


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_export_round_trips_with_every_hash(history, tmp_path, suffix):
    out = tmp_path / f"lineage.{suffix}"
    result = _cli("export", "--out", str(out), "--store", str(history.replica))
    assert result.exit_code == 0, result.output
    if suffix == "parquet":
        table = pq.read_table(out)
    else:
        types = pa_csv.ConvertOptions(column_types=EXPORT_SCHEMA)
        table = pa_csv.read_csv(out, convert_options=types)
    ledger = history.ledger(history.replica)
    assert table.num_rows == len(ledger)
    assert table.column("hash").to_pylist() == [h for _, _, h in ledger]
    assert table.column("event_key").to_pylist() == [k for _, k, _ in ledger]
    assert broken_export_rows(table) == []  # each row's hash covers its exported entry

    one = tmp_path / f"one.{suffix}"
    result = _cli(
        "export", "--out", str(one), "--identifier", "user_id:u1", "--store", str(history.state)
    )
    assert result.exit_code == 0, result.output
    assert "8 ledger entries" in result.output  # every entry here is this subject's


def test_an_exported_row_changed_afterwards_is_found(history, tmp_path):
    table = history.audit().export_table()
    entries = table.column("entry").to_pylist()
    entries[2] = entries[2].replace('"allowed"', '"withheld"')
    forged = table.set_column(
        table.schema.get_field_index("entry"), "entry", pa.array(entries, pa.string())
    )
    assert broken_export_rows(forged) == [table.column("seq")[2].as_py()]


def test_after_a_split_each_event_is_listed_under_the_person_it_belongs_to_now(tmp_path):
    """A shared inbox merges a device with a customer; an operator splits them again. The
    customer's events applied while they were merged carry the survivor's id in the ledger,
    and are listed under the customer's person now, saying so."""
    from pipelines.identity_commands import reject_link_command

    us = {"location": {"country": "US"}}

    def event(key: str, minute: int, **fields: Any) -> dict[str, Any]:
        at = f"2026-10-01T08:{minute:02d}:00Z"
        return {"messageId": key, "timestamp": at, "context": us, **fields}

    run = Run(tmp_path)
    run.feed(
        event("s-device", 0, type="identify", anonymousId="dev-9", traits={"email": "fam@x.com"}),
        event(
            "s-order",
            1,
            type="track",
            event="Order Completed",
            userId="u2",
            properties={"order_id": "o1", "total": 10, "currency": "EUR"},
        ),
        event("s-identify", 2, type="identify", userId="u2", traits={"email": "fam@x.com"}),
        event("s-page", 3, type="page", userId="u2", name="after the merge"),
    )
    links = [orjson.loads(o.value) for o in run.outputs if o.topic == topics.IDENTITY_LINKS]
    (merge,) = [link for link in links if link["kind"] == "merge"]
    survivor, customer = merge["person_id"], merge["other_person_id"]
    ingested = {
        e["event_key"]: e["person_id"]
        for o in run.outputs
        if o.topic == topics.LINEAGE
        for e in [orjson.loads(o.value)]
    }
    assert ingested["s-device"] == ingested["s-page"] == survivor  # the device is older
    command = reject_link_command(
        merge["detail"]["record_l"], merge["detail"]["record_r"], "shared inbox", "ops"
    )
    run.pipeline.process(
        [SourceRecord(topics.IDENTITY_COMMANDS, 0, next(run.offsets), command.value)],
        run.outputs.extend,
    )
    run.finish()
    audit = run.audit()

    def decisions(subject: str) -> dict[str, dict[str, Any]]:
        timeline = audit.subject(parse_subject(subject))
        return {r["event_key"]: r for r in timeline["timeline"] if r["category"] == "decision"}

    device, buyer = decisions("anonymous_id:dev-9"), decisions("user_id:u2")
    assert set(device) == {"s-device"}
    assert set(buyer) == {"s-order", "s-identify", "s-page"}
    assert device["s-device"]["detail"]["person_id"] == survivor
    assert "moved_by" not in device["s-device"]["detail"]
    page = buyer["s-page"]["detail"]
    assert page["person_id"] == customer
    assert (page["ingested_as"], page["moved_by"]) == (survivor, "split")
    assert buyer["s-order"]["detail"]["person_id"] == customer
    assert "moved_by" not in buyer["s-order"]["detail"]  # ingested as the customer

    def producing(person: str) -> dict[str, dict[str, Any]]:
        return {e["event_key"]: e for e in audit.attribute(person, "event_count")["events"]}

    assert set(producing(survivor)) == {"s-device"}
    bought = producing(customer)
    assert set(bought) == {"s-order", "s-identify", "s-page"}
    assert (bought["s-page"]["person_id"], bought["s-page"]["moved_by"]) == (customer, "split")

    run._opened.close()
    printed = runner.invoke(
        app,
        ["audit", "subject", "--identifier", "user_id:u2", "--store", str(run.replica)],
        env={"COLUMNS": "250"},
    )
    assert printed.exit_code == 0, printed.output
    assert f"ingested as {survivor}, moved by a split" in printed.output
