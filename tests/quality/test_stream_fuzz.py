"""Thousands of hostile events through the real broker and worker, then the DLQ tools on them.

The worker must stay up; every distinct payload gets exactly one outcome (received ==
applied + rejected + withheld); every dead letter carries reason codes and its original
bytes; `tessera dlq` lists, shows and replays them, and replay is idempotent.
"""

from __future__ import annotations

import random
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines import topics
from pipelines.demo import wait_until_processed
from pipelines.dlq import read_dead_letters
from pipelines.produce import produce_events
from quality.reasons import ReasonCode
from synthetic.events import _Generator

from .test_hostile_input import HOSTILE, json_values

pytestmark = pytest.mark.broker

CODES = {code.value for code in ReasonCode}
TEMPLATES: list[dict[str, Any]] = [
    {
        "type": "track",
        "event": "Order Completed",
        "userId": "u-fuzz",
        "properties": {"order_id": "o-fuzz", "total": 10.0, "currency": "EUR", "email": "a@b.co"},
    },
    {
        "type": "identify",
        "userId": "u-fuzz",
        "traits": {"email": "a@b.co", "phone": "+14155552671", "first_name": "Ann"},
    },
    {"type": "page", "anonymousId": "anon-fuzz", "name": "/", "properties": {"path": "/"}},
    {
        "type": "track",
        "event": "Ticket Opened",
        "userId": "u-fuzz",
        "properties": {"ticket_id": "t-1", "phone": "+14155552671"},
    },
]
# Values an attacker, a buggy SDK or a tired human puts in fields.
PALETTE: list[Any] = [
    None,
    "",
    "n/a",
    "N/A",
    -1,
    1e308,
    "ZZZ",
    "1970-01-01T00:00:00Z",
    "2999-01-01T00:00:00Z",
    "' OR 1=1 --",
    "<script>alert(1)</script>",
    "\u0000\u0001\u001f",
    "\u202egnp.exe",
    "a" * 5000,
    {"$ne": 1},
    [],
    True,
    "😀" * 50,
    "{{7*7}}",
    "${jndi:ldap://x/a}",
    "../../etc/passwd",
    "bob@localhost",
    "12345",
]
FIELDS = [
    "userId",
    "anonymousId",
    "timestamp",
    "type",
    "event",
    "properties.total",
    "properties.currency",
    "properties.email",
    "properties.phone",
    "properties.order_id",
    "traits.email",
    "traits.phone",
    "context",
    "context.location.country",
]
produced: set[bytes] = set()


def mutated(rng: random.Random, n: int) -> bytes:
    """A template event with one or two fields replaced by hostile values; unique messageId."""
    event = orjson.loads(orjson.dumps(rng.choice(TEMPLATES)))
    event["messageId"] = f"fuzz-{n}"
    event["timestamp"] = "2026-10-20T10:00:00Z"
    for _ in range(rng.choice([1, 1, 2])):
        path = rng.choice(FIELDS).split(".")
        node = event
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = rng.choice(PALETTE)
    return orjson.dumps(event)


def send(stack, payloads: list[bytes]) -> dict:
    produce_events(payloads, stack.bootstrap)
    produced.update(payloads)
    # One outcome per distinct payload: identical bytes are the same event, replayed.
    return wait_until_processed(stack.api_url, len(produced), timeout=900)


def cli(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], capture_output=True, timeout=300
    )
    assert done.returncode == 0, done.stderr.decode()
    return done


@pytest.fixture(scope="module")
def fuzzed(stack):
    rng = random.Random(20261123)
    generator = _Generator(10, 100, seed=1, end=datetime(2026, 11, 1, tzinfo=UTC))
    payloads = [mutated(rng, n) for n in range(3000)]
    payloads += [generator.malformed(n)[0] for n in range(200)]  # every defect class, 10 each
    payloads += HOSTILE
    payloads.append(
        orjson.dumps(
            {**TEMPLATES[0], "messageId": "fix-me-1"}
            | {
                "timestamp": "2026-10-20T10:00:00Z",
                "properties": {"order_id": "o-fix", "total": 12.5, "currency": "ZZZ"},
            }
        )
    )
    stats = send(stack, payloads)
    return stack, stats


def test_thousands_of_hostile_events_each_get_one_outcome(fuzzed):
    stack, stats = fuzzed
    assert stack.processes["worker"].poll() is None  # the worker is still up
    assert stats["received"] == len(produced) >= 3000
    assert stats["received"] == stats["applied"] + stats["rejected"] + stats["withheld"]
    assert set(stats["rejected_by_reason"]) <= CODES
    # Content errors reach the quality suites, not only the contract.
    assert {"unknown_currency", "timestamp_too_old", "timestamp_in_future"} <= set(
        stats["rejected_by_reason"]
    )


def test_every_dead_letter_has_reason_codes_and_its_original_bytes(fuzzed):
    stack, stats = fuzzed
    letters = read_dead_letters(stack.bootstrap)
    assert len(letters) == stats["rejected"]
    for letter in letters:
        assert letter.codes and set(letter.codes) <= CODES, letter.headers
        assert letter.value in produced or (not letter.value and b"" in produced)
        assert letter.source_topic in topics.INPUT_TOPICS
        for header in ("tessera.source.offset", "tessera.schema", "tessera.rejected_at"):
            assert letter.headers.get(header), (header, letter.headers)


@given(st.lists(st.binary(max_size=300) | json_values.map(orjson.dumps), min_size=50, max_size=200))
@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_random_bytes_and_json_through_the_worker_lose_nothing(fuzzed, batch):
    stack, _ = fuzzed
    stats = send(stack, [raw for raw in batch if raw])  # Kafka has no "empty" apart from null
    assert stats["received"] == stats["applied"] + stats["rejected"] + stats["withheld"]
    assert stack.processes["worker"].poll() is None


def test_dlq_list_show_and_idempotent_replay_of_a_fix(fuzzed, tmp_path):
    stack, _ = fuzzed
    listed = cli(
        "dlq",
        "list",
        "--bootstrap",
        stack.bootstrap,
        "--reason",
        "unknown_currency",
        "--json",
        "--limit",
        "1000",
    )
    rows = [orjson.loads(line) for line in listed.stdout.splitlines() if line.startswith(b"{")]
    assert rows and all("unknown_currency" in [r["code"] for r in row["reasons"]] for row in rows)
    (target,) = [row for row in rows if row["event_key"] == "fix-me-1"]
    shown = orjson.loads(
        cli("dlq", "show", str(target["offset"]), "--bootstrap", stack.bootstrap).stdout
    )
    assert shown["source"]["topic"] == topics.TRANSACTIONAL
    assert "ZZZ" in shown["payload_preview"] and shown["schema"] == "order_completed/v1"

    before = wait_until_processed(stack.api_url, len(produced))
    fixed = tmp_path / "fixed.json"
    fixed.write_bytes(
        orjson.dumps(
            {
                **TEMPLATES[0],
                "messageId": "fix-me-1",  # the same event, corrected
                "timestamp": "2026-10-20T10:00:00Z",
                "properties": {"order_id": "o-fix", "total": 12.5, "currency": "EUR"},
            }
        )
    )
    offset = str(target["offset"])
    for _ in range(2):  # twice: one outcome
        cli(
            "dlq",
            "replay",
            "--bootstrap",
            stack.bootstrap,
            "--offset",
            offset,
            "--fixed",
            str(fixed),
        )
    cli("dlq", "replay", "--bootstrap", stack.bootstrap, "--offset", offset)  # unchanged: no-op
    # A last event on the same topic and partition: once it has an outcome, so have the replays.
    sentinel = b'{"type": "track", "event": "Order Completed", "messageId": "after-replay"}'
    produce_events([sentinel], stack.bootstrap)
    after = wait_until_processed(stack.api_url, before["received"] + 2)
    assert after["received"] == before["received"] + 2
    assert after["applied"] == before["applied"] + 1  # the fix, once
    assert after["rejected"] == before["rejected"] + 1  # the sentinel
    assert after["withheld"] == before["withheld"]
