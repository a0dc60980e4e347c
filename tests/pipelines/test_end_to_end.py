"""The whole product on the real embedded broker, checked against the generator's ground truth."""

from __future__ import annotations

import csv
import subprocess
import sys
from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path

import httpx
import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from pipelines import topics
from pipelines.demo import wait_until_processed
from pipelines.produce import read_lines
from quality.reasons import QUALITY_REASONS

pytestmark = pytest.mark.broker

PERSONS, EVENTS, SEED = 150, 4000, 11
PARTS = 3  # produced one after another (see `streamed`)


def cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def consume_all(bootstrap: str, topic: str, expected: int) -> list:
    """Every message on a single-partition topic (reads until `expected` or the end)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "e2e-reader",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    messages = []
    try:
        while True:
            batch = consumer.consume(num_messages=10_000, timeout=5)
            if not batch:
                break
            eof = False
            for message in batch:
                if message.error():
                    eof = True
                    continue
                messages.append(message)
            if eof and len(messages) >= expected:
                break
    finally:
        consumer.close()
    return messages


@pytest.fixture(scope="module")
def streamed(stack, tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    events_file, truth_file = folder / "events.jsonl", folder / "truth.csv"
    cli(
        "generate",
        "--persons",
        str(PERSONS),
        "--events",
        str(EVENTS),
        "--seed",
        str(SEED),
        "--out",
        str(events_file),
        "--truth",
        str(truth_file),
        "--end",
        "2026-11-01T00:00:00",
    )
    truth = list(csv.DictReader(truth_file.open()))
    lines = list(read_lines(events_file))
    assert len(lines) == len(truth) == EVENTS
    # The stream arrives in parts, each processed before the next is produced: a worker
    # takes everything already on the topics into one batch (up to 10,000 events), and
    # persons formed in one part that a later part's events link must merge.
    processed = 0
    for part in range(PARTS):
        start, end = part * EVENTS // PARTS, (part + 1) * EVENTS // PARTS
        part_file = folder / f"events-{part}.jsonl"
        part_file.write_bytes(b"".join(line + b"\n" for line in lines[start:end]))
        cli("produce", str(part_file), "--bootstrap", stack.bootstrap)
        processed += sum(row["expected_outcome"] != "duplicate" for row in truth[start:end])
        stats = wait_until_processed(stack.api_url, processed, timeout=600)
    return stack, lines, truth, stats, events_file


def test_the_api_is_ready_only_with_a_caught_up_replica(streamed):
    stack, *_ = streamed
    assert httpx.get(f"{stack.api_url}/readyz").json() == {"status": "ready"}
    replica = httpx.get(f"{stack.api_url}/healthz").json()["replica"]
    assert replica["following"] and replica["caught_up"] and replica["records_applied"] > 0
    # Each apply is one transaction of at least one record, and its CPU is counted.
    assert 1 <= replica["applies"] <= replica["records_applied"]
    assert replica["apply_cpu_seconds"] > 0
    # Everything on the topics is applied: the counts are final, not a moment in between.
    stats = httpx.get(f"{stack.api_url}/v1/stats").json()
    assert stats["replica"] == {"caught_up": True, "at_end": True}


def test_every_event_has_exactly_its_expected_outcome(streamed):
    _, _, truth, stats, _ = streamed
    expected = Counter(row["expected_outcome"] for row in truth)
    assert stats["received"] == EVENTS - expected["duplicate"]
    assert stats["received"] == stats["applied"] + stats["rejected"] + stats["withheld"]
    assert (stats["applied"], stats["rejected"], stats["withheld"]) == (
        expected["applied"],
        expected["rejected"],
        expected["withheld"],
    )
    reasons = Counter(r["expected_reason"] for r in truth if r["expected_outcome"] == "rejected")
    assert stats["rejected_by_reason"] == dict(reasons)
    purposes = Counter(r["expected_reason"] for r in truth if r["expected_outcome"] == "withheld")
    assert stats["withheld_by_purpose"] == dict(purposes)


def test_dead_letters_keep_original_bytes_and_the_right_reason(streamed):
    stack, lines, truth, stats, _ = streamed
    dead = consume_all(stack.bootstrap, topics.REJECTED, stats["rejected"])
    assert len(dead) == stats["rejected"]
    expected = {
        lines[int(r["line"]) - 1]: r["expected_reason"]
        for r in truth
        if r["expected_outcome"] == "rejected"
    }
    got = {m.value(): dict(m.headers())["tessera.reason"].decode() for m in dead}
    assert got == expected


def test_quality_view_agrees_with_the_outcomes(streamed):
    stack, _, truth, stats, _ = streamed
    quality = httpx.get(f"{stack.api_url}/v1/quality", params={"bucket": "day"}).json()
    assert quality["rejected_by_reason"] == stats["rejected_by_reason"]
    assert sum(b["count"] for b in quality["rejections"]) == stats["rejected"]
    # The suites judge every contract-valid event once, including those they reject.
    contract_valid = sum(
        1
        for r in truth
        if r["expected_outcome"] != "duplicate"
        and not (
            r["expected_outcome"] == "rejected" and r["expected_reason"] not in QUALITY_REASONS
        )
    )
    assert sum(quality["rows_checked_by_source"].values()) == contract_valid
    assert quality["batches_checked"] > 0


def test_withheld_events_are_in_the_lineage_with_their_purpose(streamed):
    stack, _, truth, stats, _ = streamed
    entries = [
        orjson.loads(m.value())
        for m in consume_all(stack.bootstrap, topics.LINEAGE, stats["applied"] + stats["withheld"])
    ]
    by_key = {e["event_key"]: e for e in entries}
    assert len(by_key) == stats["applied"] + stats["withheld"]
    for row in truth:
        if row["expected_outcome"] == "withheld":
            entry = by_key[row["message_id"]]
            assert (entry["decision"], entry["purpose"]) == ("withheld", row["expected_reason"])
            assert entry["person_id"] is None  # no profile learns of a withheld event
        elif row["expected_outcome"] == "applied":
            assert by_key[row["message_id"]]["decision"] in ("allowed", "consent_recorded")


def _expected_per_person(lines, truth):
    """Per true person: events applied to a profile, distinct orders, value per currency."""
    want = defaultdict(lambda: {"events": 0, "orders": set(), "ltv": Counter(), "refunds": 0})
    for row in truth:
        if row["expected_outcome"] != "applied" or row["kind"] == "consent_change":
            continue
        person = want[row["person"]]
        person["events"] += 1
        event = orjson.loads(lines[int(row["line"]) - 1])
        props = event.get("properties") or {}
        if row["kind"] == "order_completed" and props["order_id"] not in person["orders"]:
            person["orders"].add(props["order_id"])
            person["ltv"][props["currency"]] += Decimal(str(props["total"]))
        elif row["kind"] == "order_refunded":
            person["refunds"] += 1
            person["ltv"][props["currency"]] -= Decimal(str(props["total"]))
    return want


def test_profiles_match_the_ground_truth_person_by_person(streamed):
    stack, lines, truth, stats, _ = streamed
    entries = [
        orjson.loads(m.value())
        for m in consume_all(stack.bootstrap, topics.LINEAGE, stats["applied"] + stats["withheld"])
    ]
    person_at_processing = {e["event_key"]: e["person_id"] for e in entries if e["person_id"]}
    final: dict[str, dict] = {}
    true_person_of_profile: dict[str, set[str]] = defaultdict(set)
    # The admins' subject-access view holds every applied event, whatever the consent.
    admin = {"X-API-Key": stack.keys["admin"]}
    with httpx.Client(base_url=stack.api_url, timeout=10, headers=admin) as http:
        for row in truth:
            pid = person_at_processing.get(row["message_id"])
            if pid is None or row["expected_outcome"] != "applied":
                continue
            if pid not in final:
                response = http.get(f"/v1/profiles/{pid}", params={"purpose": "subject_access"})
                assert response.status_code == 200, (pid, response.text)
                final[pid] = response.json()
            true_person_of_profile[final[pid]["person_id"]].add(row["person"])
    # Precision: no unified profile mixes two real people.
    mixed = {p: people for p, people in true_person_of_profile.items() if len(people) > 1}
    assert not mixed
    profiles = {p["person_id"]: p for p in final.values()}
    assert len(profiles) == stats["persons"]
    got = defaultdict(lambda: {"events": 0, "orders": 0, "ltv": Counter(), "refunds": 0})
    for person_id, profile in profiles.items():
        (true_person,) = true_person_of_profile[person_id]
        computed = profile["computed"]
        got[true_person]["events"] += computed["event_count"]
        got[true_person]["orders"] += computed["order_count"]
        got[true_person]["refunds"] += computed["refund_count"]
        for currency, value in computed["lifetime_value"].items():
            got[true_person]["ltv"][currency] += Decimal(str(value))
    want = _expected_per_person(lines, truth)
    assert set(got) == set(want)
    for person, expected in want.items():
        ltv = {c: v for c, v in expected["ltv"].items()}
        assert got[person]["events"] == expected["events"], person
        assert got[person]["orders"] == len(expected["orders"]), person
        assert got[person]["refunds"] == expected["refunds"], person
        assert {c: v for c, v in got[person]["ltv"].items() if v or c in ltv} == ltv, person
    # Anonymous browsing that later logs in ends in one profile with both device and login.
    assert any(
        p["identifiers"].get("anonymous_id") and p["identifiers"].get("user_id")
        for p in profiles.values()
    )
    assert stats["merges"] > 0


def test_replaying_the_whole_input_changes_nothing(streamed):
    stack, _, _, stats, events_file = streamed
    before = {k: stats[k] for k in ("applied", "rejected", "withheld", "persons", "merges")}
    cli("produce", str(events_file), "--bootstrap", stack.bootstrap)
    # One new event per input topic after the replay: once they have outcomes, so has the replay.
    stamp = {"timestamp": "2026-11-01T00:00:00Z", "userId": "sentinel"}
    sentinels = [
        {
            "type": "consent",
            "messageId": "s-consent",
            **stamp,
            "consent": {"purpose": "marketing", "status": "denied", "source": "test"},
        },
        {"type": "track", "event": "Order Completed", "messageId": "s-order", **stamp},
        {"type": "track", "event": "Ticket Opened", "messageId": "s-ticket", **stamp},
    ]
    sentinel = Path(events_file.parent / "sentinel.jsonl")
    sentinel.write_bytes(b"\n".join([*map(orjson.dumps, sentinels), b"sentinel garbage"]))
    routed = cli("produce", str(sentinel), "--bootstrap", stack.bootstrap)
    assert all(t in routed for t in topics.INPUT_TOPICS)
    after = wait_until_processed(stack.api_url, stats["received"] + 4)
    assert after["received"] == stats["received"] + 4
    assert after["applied"] == before["applied"] + 1  # the consent statement
    assert after["rejected"] == before["rejected"] + 3  # order and ticket lack ids, garbage
    assert {k: after[k] for k in ("withheld", "persons", "merges")} == {
        k: before[k] for k in ("withheld", "persons", "merges")
    }


def test_lookups_by_identifier_are_answered_from_the_loaded_index(streamed):
    stack, *_ = streamed
    stats = httpx.get(f"{stack.api_url}/v1/stats").json()
    # `serve` loads the identifier index even unwarmed, and it follows every apply.
    assert stats["identifier_index"]["loaded"]
    admin = {"X-API-Key": stack.keys["admin"]}
    changelog = consume_all(stack.bootstrap, topics.PROFILES_CHANGELOG, 10**9)
    latest = {m.key(): m.value() for m in changelog}
    documents = [orjson.loads(v) for v in latest.values() if v is not None]
    # The persons whose current documents list each identifier (rarely more than one).
    listing: dict[tuple[str, str], set[str]] = defaultdict(set)
    for doc in documents:
        for id_type, values in doc["identifiers"].items():
            for value in values:
                listing[(id_type, value)].add(doc["person_id"])
    assert len(listing) >= 60
    with httpx.Client(base_url=stack.api_url, timeout=10, headers=admin) as http:
        for (id_type, value), persons in sorted(listing.items())[:200]:
            answer = http.get(
                "/v1/profiles/lookup",
                params={"type": id_type, "value": value, "purpose": "subject_access"},
            )
            assert answer.status_code == 200, (id_type, value, answer.text)
            assert answer.json()["person_id"] in persons
        missing = http.get(
            "/v1/profiles/lookup",
            params={"type": "user_id", "value": "nobody-at-all", "purpose": "subject_access"},
        )
        assert missing.status_code == 404
