"""The lookup path: cached documents never outlive a change, and concurrent reads share queries."""

from __future__ import annotations

import asyncio

import duckdb
import httpx
import pytest

from pipelines import topics
from pipelines.bench_profiles import documents, templates
from profiles.reads import CoalescedReads, DocumentCache
from profiles.store import ConsumedRecord, ProfileStore

US = {"location": {"country": "US"}}


def _read(served, person, tag=None):
    headers = {"X-API-Key": served.keys["web"]} | ({"If-None-Match": tag} if tag else {})
    return httpx.get(
        f"{served.url}/v1/profiles/{person}",
        params={"purpose": "personalization"},
        headers=headers,
    )


def test_a_cached_profile_is_never_served_after_a_change_or_a_withdrawal(served, make_event):
    person = served.get("/v1/profiles/lookup", type="user_id", value="u-7").json()["person_id"]
    first = _read(served, person)
    assert first.json()["traits"]["first_name"]["value"] == "Ada"
    hits = served.store.cache.hits
    assert _read(served, person, first.headers["etag"]).status_code == 304
    assert served.store.cache.hits == hits + 1  # the second read came from the cache

    served.run.feed(
        make_event("identify", userId="u-7", traits={"first_name": "Adele"}, context=US)
    )
    served.catch_up()
    changed = _read(served, person, first.headers["etag"])
    assert changed.status_code == 200 and changed.headers["etag"] != first.headers["etag"]
    assert changed.json()["traits"]["first_name"]["value"] == "Adele"
    assert changed.json()["version"] > first.json()["version"]

    served.run.feed(
        make_event(
            "consent",
            userId="u-7",
            consent={"purpose": "personalization", "status": "withdrawn", "source": "cmp"},
        ),
        topic=topics.CONSENT,
    )
    served.catch_up()
    # The withdrawal holds from the very next read, cached copy or not.
    withdrawn = _read(served, person, changed.headers["etag"])
    assert withdrawn.status_code == 404 and withdrawn.json()["error"] == "not_found"
    assert served.get(f"/v1/profiles/{person}", key="bi", purpose="analytics").status_code == 200


def test_a_read_overtaken_by_a_write_is_not_cached():
    cache = DocumentCache(capacity=2)
    before = cache.generation
    cache.invalidate(["p1"])  # a write committed while the read was in flight
    assert cache.put([("p1", b"old")], before) is False
    assert cache.get("p1") is None
    assert cache.put([("p1", b"new"), ("p2", b"b"), ("p3", b"c")], cache.generation)
    assert cache.get("p1") is None and cache.get("p3") == b"c"  # least recently used left
    assert len(cache) == 2


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    docs = templates(persons=12, events=240, seed=5)
    keys, values = documents(docs, 0, 150)
    store = ProfileStore(tmp_path_factory.mktemp("reads") / "profiles.duckdb", cache_entries=0)
    store.apply(
        [
            ConsumedRecord(topics.PROFILES_CHANGELOG, 0, n, key, value)
            for n, (key, value) in enumerate(zip(keys, values, strict=True))
        ]
    )
    yield store, [k.decode() for k in keys]
    store.close()


def test_concurrent_reads_share_queries_and_each_gets_its_own_document(stored):
    store, persons = stored
    queries: list[list[str]] = []

    def fetch(ids: list[str]):
        queries.append(ids)
        return store.documents(ids)

    reads = CoalescedReads(fetch, max_batch=40)
    wanted = [*persons, "p_missing", persons[0]]

    async def read_all():
        return await asyncio.gather(*(reads.get(p) for p in wanted))

    found = asyncio.run(read_all())
    assert [doc["person_id"] if doc else None for doc in found] == [*persons, None, persons[0]]
    assert [len(q) for q in queries] == [40, 40, 40, 31]  # 151 distinct ids, 40 a query
    # A lone read is not held back waiting for company.
    queries.clear()
    assert asyncio.run(reads.get(persons[7]))["person_id"] == persons[7]
    assert queries == [[persons[7]]]


def test_a_failed_query_fails_every_read_waiting_on_it(tmp_path):
    store = ProfileStore(tmp_path / "closed.duckdb")
    store.close()
    reads = CoalescedReads(store.documents)

    async def read_two():
        return await asyncio.gather(reads.get("p1"), reads.get("p2"), return_exceptions=True)

    failures = asyncio.run(read_two())
    assert len(failures) == 2 and all(isinstance(f, duckdb.Error) for f in failures)
