"""Lookups by identifier from the in-memory index: exact through merges, splits, changed
identifiers and erasures, as a replica follows them from a real broker; and the same
answers over HTTP whether the index is loaded or not."""

from __future__ import annotations

import time

import duckdb
import httpx
import orjson
import pyarrow as pa
import pytest

from consent.erasure import erasure_request
from identity.normalise import Identifier, parse_identifier
from pipelines import topics
from pipelines.broker import EmbeddedBroker
from pipelines.identity_commands import reject_link_command
from pipelines.kafka import BatchProducer
from pipelines.replica import ReplicaFollower
from profiles.reads import IdentifierIndex
from profiles.store import FOLLOWED_TOPICS, ProfileStore

US = {"location": {"country": "US"}}


def _table(store: ProfileStore) -> dict[tuple[str, str], str]:
    """Who holds each identifier, as the store's table says (the truth the index mirrors)."""
    rows = store.reader().execute("SELECT id_type, id_value, person_id FROM profile_identifiers")
    return {(t, v): p for t, v, p in rows.fetchall()}


def _ever_held(run) -> set[tuple[str, str]]:
    """Every identifier any changelog document has held so far."""
    return {
        (id_type, value)
        for record in run.on(topics.PROFILES_CHANGELOG)
        if record.value
        for id_type, values in orjson.loads(record.value)["identifiers"].items()
        for value in values
    }


def _index_agrees(store: ProfileStore, run) -> dict[tuple[str, str], str]:
    table = _table(store)
    assert store.identifiers.loaded
    for id_type, value in _ever_held(run) | set(table):
        assert store.identifiers.person(id_type, value) == table.get((id_type, value)), (
            id_type,
            value,
        )
    return table


class Feed:
    """The pipeline's outputs produced to the broker; a replica follows them."""

    def __init__(self, run, bootstrap: str, follower: ReplicaFollower) -> None:
        self.run, self.follower = run, follower
        self.producer = BatchProducer(bootstrap)
        self.sent = 0
        self.followed = 0

    def __call__(self, *events, topic: str = topics.BEHAVIORAL) -> None:
        before = len(self.run.outputs)
        self.run.feed(*events, topic=topic)
        new = self.run.outputs[before:]
        self.producer.send(new)
        self.followed += sum(1 for o in new if o.topic in FOLLOWED_TOPICS)
        deadline = time.monotonic() + 60
        while not (self.follower.applied >= self.followed and self.follower.at_end):
            assert self.follower.alive and time.monotonic() < deadline, self.follower.last_error
            time.sleep(0.05)


@pytest.mark.broker
def test_the_index_follows_merges_changes_splits_and_erasures(run, make_event, tmp_path):
    store = ProfileStore(tmp_path / "replica.duckdb")
    store.identifiers.overlay_limit = 3  # fold writes into the arrays often
    with EmbeddedBroker() as broker:
        follower = ReplicaFollower(store, broker.bootstrap).start()
        feed = Feed(run, broker.bootstrap, follower)
        try:
            feed(
                make_event(
                    "identify", anonymousId="dev-9", traits={"email": "fam@x.com"}, context=US
                )
            )
            feed(
                make_event(
                    "track",
                    event="Order Completed",
                    userId="u2",
                    properties={"order_id": "o1", "total": 10, "currency": "USD"},
                    context=US,
                )
            )
            assert not store.identifiers.loaded  # not warmed yet: lookups query the table
            store.warm(freeze=False)
            before = _index_agrees(store, run)
            assert before[("anonymous_id", "dev-9")] != before[("user_id", "u2")]

            # A merge (the shared inbox): the younger person's tombstone drops its
            # identifiers, the survivor's document now holds them all.
            feed(make_event("identify", userId="u2", traits={"email": "fam@x.com"}, context=US))
            merged = _index_agrees(store, run)
            assert len(set(merged.values())) == 1

            # A split: the rejected link's records go back to two persons.
            links = [orjson.loads(o.value) for o in run.on(topics.IDENTITY_LINKS)]
            (merge,) = [link for link in links if link["kind"] == "merge"]
            command = reject_link_command(
                merge["detail"]["record_l"], merge["detail"]["record_r"], "shared inbox", "ops"
            )
            feed(command.value, topic=topics.IDENTITY_COMMANDS)
            split = _index_agrees(store, run)
            assert len(set(split.values())) == 2
            assert split[("anonymous_id", "dev-9")] != split[("user_id", "u2")]

            # A person's identifiers change: a new email joins u2's profile.
            feed(
                make_event("identify", userId="u2", traits={"email": "U2@New.Example"}, context=US)
            )
            changed = _index_agrees(store, run)
            holder = changed[("user_id", "u2")]
            assert changed[("email", "u2@new.example")] == holder
            assert store.lookup("email", " u2@NEW.example ")["person_id"] == holder

            # An erasure: everything the erased person held reads as nobody's.
            email = Identifier("email", "u2@new.example")
            feed(erasure_request(email, "test"), topic=topics.PRIVACY)
            gone = _index_agrees(store, run)
            assert holder not in gone.values() and gone  # the other person stays
            assert store.identifiers.person(*email) is None
            assert all(
                store.identifiers.person(*k) is None for k, p in changed.items() if p == holder
            )
        finally:
            feed.producer.close()
            follower.stop()
            store.close()


def test_the_index_keys_identifiers_as_duckdb_does():
    """The SQL the index is loaded with and the Python it is read with agree, non-ASCII
    and colons included; keys whose bytes end in NUL are found too."""
    conn = duckdb.connect()
    for id_type, value in [("email", "zoë@exämple.org"), ("user_id", "a:b:c"), ("phone", "+1")]:
        (sql,) = conn.execute(
            f"SELECT {IdentifierIndex.KEY_SQL} FROM (SELECT ? AS id_type, ? AS id_value)",
            [id_type, value],
        ).fetchone()
        assert sql == IdentifierIndex.key(id_type, value)
    index = IdentifierIndex(overlay_limit=2)
    index.begin()
    # Find values whose key ends in a NUL byte: NumPy's S16 strips it on reading.
    nul = [f"u{n}" for n in range(5000) if IdentifierIndex.key("user_id", f"u{n}")[-1] == 0][:2]
    assert nul
    values = [*nul, "x", "y"]
    index.load(
        pa.table(
            {
                "key": [IdentifierIndex.key("user_id", v) for v in values],
                "person_id": [f"p-{v}" for v in values],
            }
        )
    )
    assert [index.person("user_id", v) for v in values] == [f"p-{v}" for v in values]
    index.changed([("user_id", "x")], [("user_id", "z", "p-z"), ("user_id", nul[0], "p-q")])
    assert index.footprint()["pending_writes"] == 0  # folded into the arrays
    assert index.person("user_id", "x") is None
    assert index.person("user_id", "z") == "p-z" and index.person("user_id", nul[0]) == "p-q"
    assert index.person("user_id", "y") == "p-y" and len(index) == 4
    small = IdentifierIndex(capacity=1)
    small.begin()
    assert small.load(pa.table({"key": values[:2], "person_id": values[:2]})) is False
    assert not small.loaded and not small.recording


REQUESTS = [
    ("/v1/profiles/lookup", {"type": "email", "value": " ADA@example.org"}),
    ("/v1/profiles/lookup", {"type": "phone", "value": "+14155552671", "traits": "first_name"}),
    ("/v1/profiles/lookup", {"type": "email", "value": "nobody@x.org"}),
    ("/v1/profiles/lookup", {"type": "shoe_size", "value": "9"}),
    ("/v1/profiles/lookup", {"type": "email", "value": "not-an-email"}),
    ("/v1/profiles/lookup", {"type": "email"}),  # FastAPI's 422: value missing
    ("/v1/profiles/lookup", {"value": "u-7"}),
    ("/v1/profiles/lookup", {"type": "user_id", "value": "u" * 513}),  # 422: too long
    ("/v1/profiles/lookup", {"type": "user_id", "value": "u-7", "purpose": ""}),
    ("/v1/profiles/lookup", {"type": "user_id", "value": "u-7", "purpose": "marketing"}),
    ("/v1/profiles/lookup", {"type": "user_id", "value": "u-7", "traits": ","}),
    ("/v1/profiles/by-identifier/user_id:u-7", {}),
    ("/v1/profiles/by-identifier/anonymous_id:dev-1", {"traits": "first_name"}),
    ("/v1/profiles/by-identifier/user_id", {}),
    ("/v1/profiles/by-identifier/email:nobody@x.org", {}),
    ("/v1/profiles/by-identifier/user_id:" + "u" * 513, {}),
]


def _answers(served, key: str | None = "web") -> list[tuple[int, bytes, str | None]]:
    found = []
    for path, params in REQUESTS:
        response = served.get(path, key, **params)
        found.append((response.status_code, response.content, response.headers.get("etag")))
    return found


def test_identifier_routes_answer_the_same_from_the_index_and_from_the_table(served):
    cold = _answers(served)
    unauthenticated = _answers(served, None)
    assert [c[0] for c in cold] == [
        200, 200, 404, 400, 400, 422, 422, 422, 400, 403, 400, 200, 200, 400, 404, 400,
    ]  # fmt: skip
    assert {c[0] for c in unauthenticated} == {401, 422}
    served.store.warm(freeze=False)
    assert served.store.identifiers.loaded
    assert _answers(served) == cold
    assert _answers(served, None) == unauthenticated
    # Answered from memory, and what the table says.
    person = parse_identifier("email", "ada@example.org")
    assert served.store.identifiers.person(*person) == _table(served.store)[tuple(person)]
    etag = cold[0][2]
    again = httpx.get(
        f"{served.url}/v1/profiles/lookup",
        params={"type": "email", "value": "ada@example.org", "purpose": "personalization"},
        headers={"X-API-Key": served.keys["web"], "If-None-Match": etag},
    )
    assert again.status_code == 304
