"""Erasure over the pipeline (unit) and against the real broker, worker and API (integration)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import httpx
import orjson
import pytest
from confluent_kafka.admin import AdminClient

from consent.erasure import erasure_request
from consent.keys import KEY_STORE_ENV, SubjectKeyStore
from identity.normalise import Identifier
from pipelines import topics
from pipelines.kafka import BatchProducer, read_topic
from pipelines.pipeline import OutRecord, Pipeline, SourceRecord
from pipelines.produce import produce_events
from pipelines.stack import LocalStack
from profiles.access import KEYS_ENV, write_keyring

NOW = datetime.now(UTC).replace(microsecond=0)
ALICE_EMAIL, ALICE_PHONE, ALICE_ID = "Alice.Smith@Example.org", "+1 415 555 0199", "alice-42"
# Every form the subject's identifiers could be stored in: raw, lower-cased, normalised.
ALICE_FORMS = [
    ALICE_EMAIL,
    ALICE_EMAIL.lower(),
    ALICE_PHONE,
    "+14155550199",
    "4155550199",
    ALICE_ID,
    "anon-alice",
]
BOB_PHONE = "+12125550188"


def _at(minutes: int) -> str:
    return (NOW - timedelta(days=1) + timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")


US = {"location": {"country": "US"}}  # opt-out jurisdiction: analytics events are applied


def bob_events() -> list[dict[str, Any]]:
    return [
        {
            "type": "identify",
            "messageId": "bob-1",
            "context": US,
            "timestamp": _at(0),
            "anonymousId": "anon-bob",
            "traits": {"phone": BOB_PHONE, "firstName": "Bob"},
        },
        {
            "type": "page",
            "messageId": "bob-2",
            "context": US,
            "timestamp": _at(1),
            "anonymousId": "anon-bob",
            "properties": {"path": "/shoes"},
        },
    ]


def alice_events() -> list[dict[str, Any]]:
    return [
        {
            "type": "page",
            "messageId": "alice-0",
            "context": US,
            "timestamp": _at(5),
            "anonymousId": "anon-alice",
        },
        {
            "type": "identify",
            "messageId": "alice-1",
            "context": US,
            "timestamp": _at(6),
            "userId": ALICE_ID,
            "anonymousId": "anon-alice",
            "traits": {"email": ALICE_EMAIL, "phone": ALICE_PHONE, "firstName": "Alice"},
        },
        {
            "type": "consent",
            "messageId": "alice-2",
            "timestamp": _at(7),
            "userId": ALICE_ID,
            "consent": {"purpose": "marketing", "status": "granted", "source": "cmp"},
        },
        {
            "type": "page",
            "messageId": "alice-3",
            "context": US,
            "timestamp": _at(8),
            "userId": ALICE_ID,
        },
    ]


def linking_event() -> dict[str, Any]:
    """Alice signs in on Bob's device: her email with his anonymous id merges the two."""
    return {
        "type": "page",
        "messageId": "link-1",
        "timestamp": _at(10),
        "anonymousId": "anon-bob",
        "context": {**US, "traits": {"email": ALICE_EMAIL.lower()}},
    }


# -- unit: the pipeline over batches ---------------------------------------------------------


class Run:
    def __init__(self, path: Path) -> None:
        self.keys = SubjectKeyStore(path / "keys.sqlite")
        self.pipeline = Pipeline(path / "state.duckdb", key_store=self.keys, quality=False)
        self.outputs: list[OutRecord] = []
        self.offset = itertools.count()

    def feed(self, *values: dict | bytes, topic: str = topics.BEHAVIORAL):
        batch = [
            SourceRecord(
                topic, 0, next(self.offset), v if isinstance(v, bytes) else orjson.dumps(v)
            )
            for v in values
        ]
        return self.pipeline.process(batch, self.outputs.extend)

    def persons(self) -> dict[str, str]:
        return dict(
            self.pipeline.conn.execute("SELECT first_event, person_id FROM id_records").fetchall()
        )

    def certificates(self) -> list[dict[str, Any]]:
        return [orjson.loads(o.value) for o in self.outputs if o.topic == topics.ERASURES]


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    runner = Run(tmp_path)
    yield runner
    runner.pipeline.close()


def erase(run: Run, identifier: Identifier) -> dict[str, Any]:
    request = erasure_request(identifier, "test")
    run.feed(request, topic=topics.PRIVACY)
    return request


def test_erasing_a_merged_person_leaves_the_other_with_their_id_and_history(run):
    run.feed(*bob_events())
    bob = run.persons()["bob-1"]
    run.feed(*alice_events())
    run.feed(linking_event())
    assert len(set(run.persons().values())) == 1  # merged through the linking event
    request = erase(run, Identifier("email", ALICE_EMAIL.lower()))
    assert set(run.persons()) == {"bob-1", "bob-2"}  # Bob's records only
    assert set(run.persons().values()) == {bob}
    facts = run.pipeline.conn.execute(
        "SELECT event_key, person_id FROM facts ORDER BY 1"
    ).fetchall()
    assert facts == [("bob-1", bob), ("bob-2", bob)]
    changelog = [o for o in run.outputs if o.topic == topics.PROFILES_CHANGELOG]
    latest = {o.key.decode(): o.value for o in changelog}
    document = orjson.loads(run.keys.open(latest[bob]))
    assert document["identifiers"] == {"anonymous_id": ["anon-bob"], "phone": [BOB_PHONE]}
    assert document["views"]["subject_access"]["computed"]["event_count"] == 2
    erased = [p for p, v in latest.items() if v is None]
    assert erased and bob not in erased
    (certificate,) = run.certificates()
    assert certificate["request_id"] == request["request_id"]
    assert certificate["found"] is True
    assert certificate["persons_split_off"] == [bob]
    assert certificate["erased"]["worker"]["identity.records"] >= 3
    assert certificate["erased"]["worker"]["consent_state"] >= 1
    assert certificate["erased"]["key_store"]["keys_shredded"] >= 1
    entry = run.pipeline.conn.execute(
        "SELECT hash FROM lineage WHERE event_key = ?", [f"erasure:{request['request_id']}"]
    ).fetchone()
    assert certificate["ledger"]["hash"] == entry[0]
    assert run.pipeline.ledger.verify().ok
    text = orjson.dumps(certificate).decode().lower()
    assert not [form for form in ALICE_FORMS if form.lower() in text]


def test_replays_are_idempotent_and_only_new_events_start_anew(run):
    run.feed(*alice_events())
    request = erase(run, Identifier("user_id", ALICE_ID))
    assert run.persons() == {}
    # The same request again, and the same events again: nothing changes.
    report = run.feed(request, topic=topics.PRIVACY)
    assert report.duplicates == 1 and report.received == 0
    assert len(run.certificates()) == 1
    report = run.feed(*alice_events())
    assert report.duplicates == 4 and run.persons() == {}
    # A new event from before the erasure (a late delivery) is withheld, with its reason.
    late = {**alice_events()[3], "messageId": "alice-late"}
    assert run.feed(late).outcomes == {"withheld": 1}
    reason = run.pipeline.conn.execute(
        "SELECT reason FROM outcomes WHERE event_key = 'alice-late'"
    ).fetchone()
    assert reason == ("erased",)
    # An event after the erasure legitimately starts a new person, with a new id.
    fresh = {**late, "messageId": "alice-new", "timestamp": datetime.now(UTC).isoformat()}
    assert run.feed(fresh).outcomes == {"applied": 1}
    assert set(run.persons()) == {"alice-new"}


def test_dead_letters_are_sealed_for_their_subjects_and_shredded_with_them(run):
    bad = {**alice_events()[3], "messageId": "alice-bad", "timestamp": "not a time"}
    assert run.feed(bad).outcomes == {"rejected": 1}
    run.feed(*alice_events())
    (letter,) = [o for o in run.outputs if o.topic == topics.REJECTED]
    assert ALICE_ID.encode() not in letter.value
    assert orjson.loads(run.keys.open(letter.value))["messageId"] == "alice-bad"
    erase(run, Identifier("user_id", ALICE_ID))
    assert run.keys.open(letter.value) is None


def test_unknown_and_malformed_requests_each_get_one_outcome(run):
    erase(run, Identifier("email", "nobody@example.net"))
    (certificate,) = run.certificates()
    assert certificate["found"] is False
    assert certificate["erased"]["worker"]["identity.records"] == 0
    report = run.feed(
        b'{"type": "erasure", "subject": "email:alice@example.org"}', topic=topics.PRIVACY
    )
    assert report.outcomes == {"rejected": 1}
    (letter,) = [o for o in run.outputs if o.topic == topics.REJECTED]
    assert dict(letter.headers)["tessera.reason"] == b"invalid_privacy_request"


def test_sealed_input_of_an_erased_subject_cannot_be_read_again(run):
    raw = orjson.dumps(alice_events()[1])
    sealed = run.keys.seal(raw, ["user_id:x"])
    assert ALICE_ID.encode() not in sealed and run.keys.open(sealed) == raw
    key = run.keys.key_for(["user_id:x"])[1]
    assert run.keys.shred(["user_id:x"]) == 1
    assert run.keys.open(sealed) is None
    # The key's bytes are gone from the files too, not only from the table.
    for path in Path(run.keys.path).parent.glob("keys.sqlite*"):
        assert key not in path.read_bytes(), path.name
    assert run.feed(sealed).outcomes == {"rejected": 1}


# -- integration: real broker, worker and API processes --------------------------------------


@pytest.fixture(scope="module")
def sealed_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A stack whose worker, API and producer share a per-subject key store."""
    data_dir = tmp_path_factory.mktemp("erasure")
    keys = write_keyring(
        data_dir / "api-keys.yaml",
        [{"name": "admin", "role": "admin"}, {"name": "auditor", "role": "auditor"}],
    )
    saved = {name: os.environ.get(name) for name in (KEYS_ENV, KEY_STORE_ENV)}
    os.environ[KEYS_ENV] = str(data_dir / "api-keys.yaml")
    os.environ[KEY_STORE_ENV] = str(data_dir / "subject-keys.sqlite")
    try:
        with LocalStack(data_dir) as running:
            running.keys = keys  # type: ignore[attr-defined]
            yield running
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _produce(stack: LocalStack, events: list[dict[str, Any]]) -> None:
    keys = SubjectKeyStore(os.environ[KEY_STORE_ENV])
    produce_events([orjson.dumps(e) for e in events], stack.bootstrap, keys=keys)


def _poll(check, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError("condition not reached in time")


def _lookup(stack: LocalStack, id_type: str, value: str) -> httpx.Response:
    return httpx.get(
        f"{stack.api_url}/v1/profiles/lookup",
        params={"type": id_type, "value": value, "purpose": "subject_access"},
        headers={"X-API-Key": stack.keys["admin"]},
        timeout=10,
    )


def test_erasure_end_to_end_leaves_no_plaintext_anywhere(sealed_stack):
    stack = sealed_stack
    admin = {"X-API-Key": stack.keys["admin"]}
    _produce(stack, bob_events())
    bob = _poll(
        lambda: (
            _lookup(stack, "phone", BOB_PHONE).status_code == 200
            and _lookup(stack, "phone", BOB_PHONE).json()
        )
    )["person_id"]
    # Alice is a person of her own before the event that links her to Bob, so the two
    # persons merge (in one batch with it, her records would join Bob's person instead).
    _produce(stack, alice_events())
    _poll(lambda: _lookup(stack, "email", ALICE_EMAIL).status_code == 200)
    _produce(stack, [linking_event()])
    merged = _poll(
        lambda: (
            (r := _lookup(stack, "email", ALICE_EMAIL)).status_code == 200
            and r.json()["person_id"] == _lookup(stack, "phone", BOB_PHONE).json()["person_id"]
            and r.json()
        )
    )
    assert "phone" in merged["identifiers"]

    # Roles: an auditor may read certificates but not ask for erasures.
    body = {"type": "email", "value": ALICE_EMAIL}
    assert httpx.post(f"{stack.api_url}/v1/privacy/erasures", json=body).status_code == 401
    auditor = {"X-API-Key": stack.keys["auditor"]}
    assert (
        httpx.post(f"{stack.api_url}/v1/privacy/erasures", json=body, headers=auditor).status_code
        == 403
    )
    answer = httpx.post(f"{stack.api_url}/v1/privacy/erasures", json=body, headers=admin)
    assert answer.status_code == 202
    request_id = answer.json()["request_id"]
    certificate = _poll(
        lambda: (
            (
                r := httpx.get(f"{stack.api_url}/v1/privacy/erasures/{request_id}", headers=auditor)
            ).status_code
            == 200
            and r.json()
        )
    )
    assert certificate["found"] and certificate["persons_split_off"] == [bob]
    assert certificate["persons_erased"] and bob not in certificate["persons_erased"]
    assert certificate["erased"]["replica"]["identity_events"] >= 1
    _poll(lambda: _lookup(stack, "email", ALICE_EMAIL).status_code == 404)
    bob_now = _lookup(stack, "phone", BOB_PHONE).json()
    assert bob_now["person_id"] == bob
    assert bob_now["computed"]["event_count"] == 2
    assert set(bob_now["identifiers"]) == {"anonymous_id", "phone"}

    # Replaying the input (the same sealed bytes) and the request changes nothing for Alice.
    _produce(stack, [*alice_events(), linking_event(), *bob_events()])
    time.sleep(3)
    assert _lookup(stack, "email", ALICE_EMAIL).status_code == 404
    assert _lookup(stack, "phone", BOB_PHONE).json()["person_id"] == bob

    # The request again, as a replay of its topic would send it: a duplicate, no second
    # certificate. The CLI's request for an unknown identifier comes after it on the topic,
    # so its certificate shows the replay was processed.
    (request,) = [r for r in read_topic(stack.bootstrap, topics.PRIVACY)]
    replay = OutRecord(topics.PRIVACY, request[2], request[3])
    producer = BatchProducer(stack.bootstrap)
    producer.send([replay])
    producer.close()
    cli = [sys.executable, "-m", "pipelines.cli", "privacy"]
    printed = subprocess.run(
        [*cli, "erase", "--identifier", "email:Nobody@Example.net", "--bootstrap", stack.bootstrap],
        capture_output=True,
        check=True,
        timeout=120,
    )
    unknown = orjson.loads(printed.stdout)
    assert unknown["found"] is False and unknown["persons_erased"] == []
    assert b"nobody" not in printed.stdout.lower()
    printed = subprocess.run(
        [*cli, "certificate", request_id, "--bootstrap", stack.bootstrap],
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert orjson.loads(printed.stdout)["ledger"] == certificate["ledger"]
    issued = [k for _, _, k, _, _ in read_topic(stack.bootstrap, topics.ERASURES)]
    assert issued.count(request_id.encode()) == 1 and len(issued) == 2

    # The scan: every topic (keys, values, headers), then every DuckDB file, processes stopped.
    forms = [f.lower().encode() for f in ALICE_FORMS]
    admin_client = AdminClient({"bootstrap.servers": stack.bootstrap})
    names = sorted(admin_client.list_topics(timeout=10).topics)
    assert {*topics.OUTPUT_TOPICS, *topics.PRIVACY_OUTPUT_TOPICS, *topics.WORKER_TOPICS} <= set(
        names
    )
    scanned, leaks = 0, []
    for name in names:
        for _, offset, key, value, headers in read_topic(stack.bootstrap, name):
            scanned += 1
            blob = b"\x00".join([key or b"", value or b"", *(k.encode() + v for k, v in headers)])
            leaks += [(name, offset, f) for f in forms if f in blob.lower()]
    assert scanned > 20 and leaks == []
    for process in list(stack.processes):
        stack.stop_process(process)
    files = sorted(stack.data_dir.rglob("*.duckdb"))
    assert len(files) >= 2
    for path in files:
        conn = duckdb.connect(str(path), read_only=True)
        try:
            for (table,) in conn.execute("SELECT table_name FROM duckdb_tables()").fetchall():
                for row in conn.execute(f'SELECT * FROM "{table}"').fetchall():
                    text = str(row).lower()
                    leaks += [(path.name, table, f) for f in forms if f.decode() in text]
        finally:
            conn.close()
    assert leaks == []
