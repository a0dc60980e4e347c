"""The documented change-feed consumer, run as a process against a real broker."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest
from confluent_kafka import Producer

from pipelines import topics
from pipelines.broker import EmbeddedBroker

pytestmark = pytest.mark.broker
US = {"location": {"country": "US"}}


def test_the_example_consumer_follows_upserts_merges_and_consent(run, make_event):
    run.feed(make_event("page", anonymousId="dev-1", context=US))
    run.feed(
        make_event(
            "identify", userId="u-1", anonymousId="dev-2", traits={"plan": "pro"}, context=US
        )
    )
    run.feed(make_event("identify", userId="u-1", anonymousId="dev-1", context=US))  # a merge
    run.feed(
        make_event(
            "consent",
            userId="u-1",
            consent={"purpose": "personalization", "status": "withdrawn", "source": "cmp"},
        ),
        topic=topics.CONSENT,
    )
    changelog = run.on(topics.PROFILES_CHANGELOG)
    assert any(r.value is None for r in changelog)  # the merge tombstoned the younger person
    with EmbeddedBroker() as broker:
        producer = Producer({"bootstrap.servers": broker.bootstrap})
        for record in changelog:
            producer.produce(topics.PROFILES_CHANGELOG, key=record.key, value=record.value)
        assert producer.flush(30) == 0
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "profiles.changelog_consumer",
                "--bootstrap",
                broker.bootstrap,
                "--purpose",
                "personalization",
                "--until-end",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
    lines = [orjson.loads(line) for line in out.splitlines()]
    assert [(c["person_id"], c["change"]) for c in lines] == [
        (r.key.decode(), "upsert" if r.value else "tombstone") for r in changelog
    ]
    latest: dict[str, dict | None] = {}
    for change in lines:
        latest[change["person_id"]] = change
    survivors = {p for p, c in latest.items() if c["change"] == "upsert"}
    assert survivors == set(run.latest_documents())
    (person,) = survivors
    before = [c for c in lines if c["person_id"] == person and c["profile"]]
    assert before[-1]["profile"]["traits"]["plan"]["value"] == "pro"
    assert before[-1]["profile"]["computed"]["event_count"] == 3
    # After the withdrawal the personalization view is gone from the last document.
    assert latest[person]["profile"] is None
