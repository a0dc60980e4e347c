"""Enforcement at read: a profile read for purpose P returns only what current consent allows."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consent.policy import load_policy
from pipelines import topics
from pipelines.pipeline import Pipeline, SourceRecord
from profiles.store import ConsumedRecord, ProfileStore

POLICY = load_policy()
START = datetime(2026, 10, 1, 8, tzinfo=UTC)
_ids = itertools.count(1)


def at(minute: int) -> str:
    return (START + timedelta(minutes=minute)).isoformat().replace("+00:00", "Z")


def consent(purpose: str, status: str, minute: int, user: str = "u1") -> dict[str, Any]:
    return {
        "type": "consent",
        "messageId": f"c-{next(_ids)}",
        "timestamp": at(minute),
        "userId": user,
        "consent": {"purpose": purpose, "status": status, "source": "cmp-test"},
    }


def identify(minute: int, traits: dict[str, Any], country: str = "DE") -> dict[str, Any]:
    return {
        "type": "identify",
        "messageId": f"i-{next(_ids)}",
        "timestamp": at(minute),
        "userId": "u1",
        "traits": traits,
        "context": {"location": {"country": country}},
    }


def page(minute: int, traits: dict[str, Any], country: str = "DE") -> dict[str, Any]:
    return {
        "type": "page",
        "messageId": f"p-{next(_ids)}",
        "timestamp": at(minute),
        "userId": "u1",
        "name": "home",
        "context": {"location": {"country": country}, "traits": traits},
    }


def topic_of(event: dict[str, Any]) -> str:
    return topics.CONSENT if event["type"] == "consent" else topics.BEHAVIORAL


def read(run, person: str, purpose: str) -> dict[str, Any] | None:
    """Materialise every output the run produced in a replica and read it like the API."""
    store = ProfileStore(":memory:")
    try:
        store.apply(
            [
                ConsumedRecord(o.topic, 0, n, o.key, o.value, o.headers)
                for n, o in enumerate(run.outputs)
            ]
        )
        return store.get(person, purpose)
    finally:
        store.close()


def feed(run, *events: dict[str, Any]) -> None:
    for event in events:
        run.feed(event, topic=topic_of(event))


def person_of(run) -> str:
    (person,) = run.latest_documents()
    return person


def test_withdrawal_then_read_hides_the_data_and_republishes_the_profile(run):
    feed(run, consent("personalization", "granted", 0), identify(5, {"first_name": "Ada"}))
    person = person_of(run)
    before = read(run, person, "personalization")
    assert before is not None and before["traits"]["first_name"]["value"] == "Ada"
    assert before["identifiers"] == {"user_id": ["u1"]}
    published = len(run.on(topics.PROFILES_CHANGELOG))
    feed(run, consent("personalization", "withdrawn", 10))
    # The withdrawal published a new version of the profile, without the view.
    assert len(run.on(topics.PROFILES_CHANGELOG)) == published + 1
    assert "personalization" not in run.latest_documents()[person]["views"]
    assert read(run, person, "personalization") is None
    # What is held is still held (until erasure): the subject-access view shows it.
    assert read(run, person, "subject_access")["traits"]["first_name"]["value"] == "Ada"
    # Granting again brings the view back: consent is the switch, not the data.
    feed(run, consent("personalization", "granted", 20))
    assert read(run, person, "personalization")["traits"]["first_name"]["value"] == "Ada"


def test_out_of_order_consent_resolves_by_timestamp(run):
    feed(run, identify(5, {"first_name": "Ada"}, country="US"))
    person = person_of(run)
    assert read(run, person, "personalization") is not None  # US default: granted
    # The withdrawal at 12:00 arrives before the grant made at 11:00.
    feed(
        run,
        consent("personalization", "withdrawn", 240),
        consent("personalization", "granted", 180),
    )
    assert read(run, person, "personalization") is None
    # A restated grant newer than the first but older than the withdrawal loses too.
    feed(
        run,
        consent("marketing", "granted", 100),
        consent("marketing", "granted", 300),
        consent("marketing", "denied", 200),
    )
    assert read(run, person, "marketing") is not None


def test_withdrawing_the_ingestion_purpose_removes_its_events_from_every_view(run):
    feed(
        run,
        consent("analytics", "granted", 0),
        consent("personalization", "granted", 0),
        page(5, {"plan": "pro"}),
        identify(6, {"first_name": "Ada"}),
    )
    person = person_of(run)
    assert set(read(run, person, "personalization")["traits"]) == {"plan", "first_name"}
    feed(run, consent("analytics", "withdrawn", 10))
    view = read(run, person, "personalization")
    assert set(view["traits"]) == {"first_name"}  # the page was collected for analytics
    assert view["computed"]["event_count"] == 1


PURPOSES = ("analytics", "personalization")
_op = st.one_of(
    st.tuples(
        st.just("consent"),
        st.sampled_from(PURPOSES),
        st.sampled_from(["granted", "denied", "withdrawn"]),
    ),
    st.tuples(st.sampled_from(["identify", "page"]), st.sampled_from(["DE", "US", "BR"])),
)


def _allowed(statements: dict[str, tuple[int, str]], purpose: str | None, country: str) -> bool:
    """The oracle: the latest statement for a purpose, else the jurisdiction's default."""
    if purpose is None:
        return True
    if purpose in statements:
        return statements[purpose][1] == "granted"
    return POLICY.default_status(POLICY.jurisdiction_of(country), purpose) == "granted"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(_op, min_size=1, max_size=14),
    data=st.data(),
)
def test_a_read_for_p_never_returns_an_attribute_from_an_event_without_consent_for_p(ops, data):
    """Random consent histories (out of order) and events, in random batches.

    Each event carries one trait named after it, so every returned trait names the event
    it came from. For each purpose P, the view returns exactly the applied events whose
    person consents, now, to P and to the purpose the event was collected for.
    """
    minutes = data.draw(st.permutations(range(len(ops))))
    events: list[dict[str, Any]] = []
    country_of: dict[str, str] = {}
    statements: dict[str, tuple[int, str]] = {}
    for n, (op, minute) in enumerate(zip(ops, minutes, strict=True)):
        if op[0] == "consent":
            events.append(consent(op[1], op[2], minute))
            if op[1] not in statements or statements[op[1]][0] < minute:
                statements[op[1]] = (minute, op[2])
        else:
            make = identify if op[0] == "identify" else page
            events.append(make(minute, {f"t{n}": n}, op[1]))
            country_of[f"t{n}"] = op[1]
    cuts = sorted(data.draw(st.sets(st.integers(1, len(events)), max_size=4)) | {len(events)})
    pipeline = Pipeline(":memory:", quality=False)
    outputs: list = []
    offsets = itertools.count()
    start = 0
    for cut in cuts:
        batch = [
            SourceRecord(topic_of(e), 0, next(offsets), orjson.dumps(e)) for e in events[start:cut]
        ]
        pipeline.process(batch, outputs.extend)
        start = cut
    pipeline.close()

    class _Run:
        pass

    run = _Run()
    run.outputs = outputs
    applied = {
        e["event_key"]
        for o in outputs
        if o.topic == topics.LINEAGE
        for e in [orjson.loads(o.value)]
        if e["decision"] == "allowed"
    }
    applied_traits = {
        f"t{n}"
        for n, e in enumerate(events)
        if e["type"] != "consent" and e["messageId"] in applied
    }
    persons = {o.key.decode() for o in outputs if o.topic == topics.PROFILES_CHANGELOG and o.value}
    for purpose in (*PURPOSES, "marketing"):
        returned: set[str] = set()
        for person in persons:
            view = read(run, person, purpose)
            if view is not None:
                returned |= set(view["traits"])
        for trait in returned:
            kind_purpose = "analytics" if events[int(trait[1:])]["type"] == "page" else None
            country = country_of[trait]
            assert _allowed(statements, purpose, country), (purpose, trait)
            assert _allowed(statements, kind_purpose, country), (purpose, trait)
        expected = {
            t
            for t in applied_traits
            if _allowed(statements, purpose, country_of[t])
            and _allowed(
                statements,
                "analytics" if events[int(t[1:])]["type"] == "page" else None,
                country_of[t],
            )
        }
        assert returned == expected, purpose


def anonymous_consent(purpose: str, status: str, minute: int) -> dict[str, Any]:
    """A statement made under the anonymous id alone (a cookie banner before login)."""
    event = consent(purpose, status, minute)
    del event["userId"]
    event["anonymousId"] = "a1"
    return event


@pytest.mark.parametrize("denied_first", [True, False])
def test_equally_recent_statements_under_two_identifiers_resolve_to_the_refusal(run, denied_first):
    # One person holds u1 and a1; at the same instant a1 refused and u1 granted. Whatever
    # order the two arrive in, the refusal decides, and every rebuild agrees.
    identified = identify(5, {"first_name": "Ada"}, country="US")
    identified["anonymousId"] = "a1"
    statements = [
        anonymous_consent("personalization", "denied", 10),
        consent("personalization", "granted", 10),
    ]
    feed(run, identified, *(statements if denied_first else statements[::-1]))
    person = person_of(run)
    assert read(run, person, "personalization") is None
    feed(run, identify(20, {"last_name": "Lovelace"}, country="US"))  # a rebuild
    assert read(run, person, "personalization") is None
    assert read(run, person, "subject_access")["traits"]["last_name"]["value"] == "Lovelace"
