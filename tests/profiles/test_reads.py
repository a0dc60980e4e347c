"""The lookup path: cached documents and answers never outlive a change, never leak
between purposes or trait selections, and concurrent reads share queries."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import duckdb
import httpx
import orjson
import pytest
from fastapi import FastAPI, Query

from pipelines import topics
from pipelines.bench_profiles import documents, templates
from profiles.direct_route import DirectRoute
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
    answered = served.store.cache.answer_hits
    assert _read(served, person, first.headers["etag"]).status_code == 304
    assert served.store.cache.answer_hits == answered + 1  # the second read came from the cache

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


def test_a_write_drops_the_persons_answers_and_refuses_answers_in_flight():
    cache = DocumentCache(capacity=4, answer_capacity=2)
    before = cache.generation
    assert cache.keep_answer("p1", ("personalization", None), "a1", before)
    assert cache.keep_answer("p2", ("personalization", None), "a2", before)
    cache.invalidate(["p1"])
    assert cache.answer("p1", ("personalization", None)) is None
    assert cache.answer("p2", ("personalization", None)) == "a2"  # another person's stays
    # Rendered from a read that began before the write: refused.
    assert cache.keep_answer("p1", ("personalization", None), "stale", before) is False
    assert cache.answer("p1", ("personalization", None)) is None
    now = cache.generation
    assert cache.keep_answer("p3", ("analytics", None), "a3", now)
    assert cache.keep_answer("p4", ("analytics", None), "a4", now)
    assert cache.answer("p2", ("personalization", None)) is None  # least recently used left
    assert cache.answer("p3", ("analytics", None)) == "a3"
    assert cache.answer("p3", ("personalization", None)) is None  # shapes are kept apart


def _selected(served, person, key="web", purpose="personalization", traits=None, tag=None):
    headers = {"X-API-Key": served.keys[key]} | ({"If-None-Match": tag} if tag else {})
    params = {"purpose": purpose} | ({"traits": traits} if traits else {})
    return httpx.get(f"{served.url}/v1/profiles/{person}", params=params, headers=headers)


def test_cached_answers_never_leak_across_purposes_selections_or_keys(served):
    person = served.get("/v1/profiles/lookup", type="user_id", value="u-7").json()["person_id"]
    narrow = _selected(served, person, traits="first_name")
    assert list(narrow.json()["traits"]) == ["first_name"] and narrow.json()["computed"] == {}
    assert _selected(served, person, traits="first_name").json() == narrow.json()  # cached
    whole = _selected(served, person)
    assert set(whole.json()["traits"]) > {"first_name"} and whole.json()["computed"]
    # The same names in another order are the same selection: one answer, one ETag.
    both = _selected(served, person, traits="first_name,order_count")
    assert (
        _selected(served, person, traits="order_count,first_name").headers["etag"]
        == (both.headers["etag"])
    )
    # Another purpose's cached answer is never served for this one, nor to a key without it.
    analytics = _selected(served, person, key="bi", purpose="analytics")
    assert analytics.status_code == 200 and analytics.json()["purpose"] == "analytics"
    assert _selected(served, person, key="web", purpose="analytics").status_code == 403
    assert _selected(served, person, key="auditor").status_code == 403
    assert _selected(served, person).json()["purpose"] == "personalization"
    # A cached answer is not a pass: a client's ETag from it still needs a key.
    missing_key = httpx.get(
        f"{served.url}/v1/profiles/{person}",
        params={"purpose": "personalization"},
        headers={"If-None-Match": whole.headers["etag"]},
    )
    assert missing_key.status_code == 401


def test_an_answer_rendered_on_another_day_is_not_served(served):
    person = served.get("/v1/profiles/lookup", type="user_id", value="u-7").json()["person_id"]
    fresh = _selected(served, person)
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    # As if rendered yesterday: windowed traits and days-since counts may differ today.
    served.store.cache.keep_answer(
        person,
        ("personalization", None),
        (yesterday, b'{"stale":true}', '"old"'),
        served.store.cache.generation,
    )
    again = _selected(served, person, tag='"old"')
    assert again.status_code == 200 and again.json() == fresh.json()
    assert again.headers["etag"] == fresh.headers["etag"]


def test_a_merged_away_id_reads_its_survivors_latest_answer(served, make_event):
    profile = served.get("/v1/profiles/lookup", type="user_id", value="u-7").json()
    (old,) = profile["merged_from"]
    first = _selected(served, old)
    assert first.json()["person_id"] == profile["person_id"]
    served.run.feed(
        make_event("identify", userId="u-7", traits={"first_name": "Adele"}, context=US)
    )
    served.catch_up()  # a write to the survivor, which the old id's answer comes from
    changed = _selected(served, old, tag=first.headers["etag"])
    assert changed.status_code == 200
    assert changed.json()["traits"]["first_name"]["value"] == "Adele"


def test_a_direct_route_publishes_its_parameters_and_refuses_constrained_ones(served):
    spec = httpx.get(f"{served.url}/openapi.json").json()
    operation = spec["paths"]["/v1/profiles/{person_id}"]["get"]
    published = {(p["in"], p["name"]) for p in operation["parameters"]}
    assert published >= {
        ("path", "person_id"),
        ("query", "purpose"),
        ("query", "traits"),
        ("header", "if-none-match"),
    }
    assert operation["security"] == [{"APIKeyHeader": []}]
    # Parameters read as FastAPI reads them: a repeated query parameter's last value, an
    # empty key header as no key.
    person = served.get("/v1/profiles/lookup", type="user_id", value="u-7").json()["person_id"]
    repeated = httpx.get(
        f"{served.url}/v1/profiles/{person}?purpose=analytics&purpose=personalization",
        headers={"X-API-Key": served.keys["web"]},
    )
    assert repeated.status_code == 200 and repeated.json()["purpose"] == "personalization"
    empty = httpx.get(
        f"{served.url}/v1/profiles/{person}",
        params={"purpose": "personalization"},
        headers={"X-API-Key": ""},
    )
    assert empty.status_code == 401

    async def patterned(name: str, q: str | None = Query(None, pattern="^a")) -> None:
        return None

    with pytest.raises(TypeError, match="constrained at most by max_length"):
        FastAPI().router.add_api_route(
            "/x/{name}", patterned, methods=["GET"], route_class_override=DirectRoute
        )


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


def test_warming_fills_the_cache_and_a_write_still_replaces_a_warmed_document(stored, tmp_path):
    source, persons = stored
    changelog = [
        ConsumedRecord(
            topics.PROFILES_CHANGELOG, 0, n, p.encode(), orjson.dumps(source.document(p))
        )
        for n, p in enumerate(persons)
    ]
    store = ProfileStore(tmp_path / "warm.duckdb", cache_entries=100)
    store.apply(changelog)
    store.cache.invalidate(persons)  # start cold, as a freshly opened store does
    assert store.warm(chunk=30) == 100  # 150 stored, room for 100
    warmed = next(p for p in persons if store.cache.get(p) is not None)
    misses = store.cache.misses
    assert store.document(warmed)["person_id"] == warmed
    assert store.cache.misses == misses  # answered from memory, no query
    changed = source.document(warmed) | {"version": 99}
    store.apply(
        [ConsumedRecord(topics.PROFILES_CHANGELOG, 0, 150, warmed.encode(), orjson.dumps(changed))]
    )
    assert store.document(warmed)["version"] == 99
    store.close()


def test_a_failed_query_fails_every_read_waiting_on_it(tmp_path):
    store = ProfileStore(tmp_path / "closed.duckdb")
    store.close()
    reads = CoalescedReads(store.documents)

    async def read_two():
        return await asyncio.gather(reads.get("p1"), reads.get("p2"), return_exceptions=True)

    failures = asyncio.run(read_two())
    assert len(failures) == 2 and all(isinstance(f, duckdb.Error) for f in failures)
