"""The synthetic stream: reproducible, valid where it says so, broken where it says so."""

import json
from collections import Counter
from datetime import UTC, datetime

import orjson
import phonenumbers
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from pipelines.topics import route
from schemas.registry import SCHEMA_ROOT
from synthetic.events import generate, write_dataset

END = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def stream():
    return list(generate(persons=120, events=3000, seed=3, end=END))


@pytest.fixture(scope="module")
def reference_validators():
    """The pure-Python reference implementation, independent of the compiled validator."""
    docs = {p.stem: json.loads(p.read_text()) for p in (SCHEMA_ROOT / "v1").glob("*.json")}
    registry = Registry().with_resources(
        (d["$id"], Resource.from_contents(d)) for d in docs.values()
    )
    return {k: Draft202012Validator(d, registry=registry) for k, d in docs.items() if k != "common"}


def test_same_arguments_same_bytes_and_another_seed_differs(tmp_path):
    paths = [tmp_path / f"{n}.jsonl" for n in range(3)]
    for path, seed in zip(paths, (5, 5, 6), strict=True):
        write_dataset(path, path.with_suffix(".csv"), persons=50, events=800, seed=seed, end=END)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].with_suffix(".csv").read_bytes() == paths[1].with_suffix(".csv").read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()


def test_exact_line_count_and_truth_per_line(stream):
    assert len(stream) == 3000
    assert [row.line for _, row in stream] == list(range(1, 3001))
    assert all(b"\n" not in raw for raw, _ in stream)
    assert all(row.topic == route(raw)[0] for raw, row in stream)


def test_valid_lines_pass_the_reference_validator(stream, reference_validators):
    checked = 0
    for raw, row in stream:
        if row.kind == "malformed":
            continue
        errors = list(reference_validators[row.kind].iter_errors(orjson.loads(raw)))
        assert not errors, (row, errors[0].message)
        checked += 1
    assert checked > 2800


def test_outcome_shares_are_realistic(stream):
    outcomes = Counter(row.expected_outcome for _, row in stream)
    assert outcomes["rejected"] == 60  # 2 %
    assert outcomes["duplicate"] == 15  # 0.5 %
    assert 0.05 < outcomes["withheld"] / len(stream) < 0.25
    reasons = Counter(
        row.expected_reason for _, row in stream if row.expected_outcome == "rejected"
    )
    assert len(reasons) >= 12  # every defect class appears
    kinds = Counter(row.kind for _, row in stream)
    for kind in (
        "identify",
        "alias",
        "order_completed",
        "order_refunded",
        "ticket_opened",
        "ticket_closed",
        "csat_submitted",
        "consent_change",
        "page",
        "screen",
        "track",
    ):
        assert kinds[kind] > 0, kind


def test_duplicates_repeat_an_earlier_line_byte_for_byte(stream):
    seen = set()
    for raw, row in stream:
        if row.expected_outcome == "duplicate":
            assert raw in seen
        seen.add(raw)


def test_journeys_and_identifier_variants_exist(stream):
    events = [(orjson.loads(raw), row) for raw, row in stream if row.kind != "malformed"]
    anon_first = {e["anonymousId"] for e, _ in events if "userId" not in e and "anonymousId" in e}
    assert any(e.get("userId") and e.get("anonymousId") in anon_first for e, _ in events)
    emails = [e["traits"]["email"] for e, _ in events if e["type"] == "identify"]
    assert any(email != email.strip().lower() for email in emails)  # casing/space variants
    phones = [
        e["traits"]["phone"]
        for e, _ in events
        if e["type"] == "identify" and "phone" in e["traits"]
    ]
    assert any(not p.startswith("+") for p in phones)  # national formats, with a region given
    for e, _ in events:
        if e["type"] == "identify" and "phone" in e["traits"]:
            region = e["context"]["location"]["country"]
            assert phonenumbers.is_valid_number(phonenumbers.parse(e["traits"]["phone"], region))
    # A device used by two registered people (a household tablet), always with a user id.
    users_per_device = Counter()
    pairs = {
        (e["anonymousId"], e["userId"])
        for e, _ in events
        if e.get("userId") and e.get("anonymousId")
    }
    for device, _ in pairs:
        users_per_device[device] += 1
    assert max(users_per_device.values()) >= 2


def test_too_few_events_for_the_persons_is_an_error():
    with pytest.raises(ValueError, match="too few"):
        list(generate(persons=100, events=150, seed=1, end=END))
