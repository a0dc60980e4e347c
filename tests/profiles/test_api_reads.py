"""Profile reads over a real socket: batch lookups, trait selection, ETags, segments, OpenAPI."""

from __future__ import annotations

import httpx
import orjson

from pipelines import topics
from profiles.store import ConsumedRecord, ProfileStore


def _profile(served) -> dict:
    return served.get("/v1/profiles/lookup", type="user_id", value="u-7").json()


def test_batch_lookup_returns_each_requested_person_and_names_the_missing(served):
    person = _profile(served)["person_id"]
    (old,) = _profile(served)["merged_from"]
    response = httpx.post(
        f"{served.url}/v1/profiles/batch",
        params={"purpose": "personalization", "traits": "order_count,first_name"},
        json={"person_ids": [person, old, "p_nobody", "p_o'brien"]},
        headers={"X-API-Key": served.keys["web"]},
    )
    assert response.status_code == 200
    body = response.json()
    assert body["missing"] == ["p_nobody", "p_o'brien"]  # a quote is data, not SQL
    assert body["profiles"][old]["person_id"] == person  # a merged-away id reads the survivor
    assert body["profiles"][person]["computed"] == {"order_count": 1}
    assert set(body["profiles"][person]["traits"]) == {"first_name"}


def test_batch_lookup_errors(served):
    url = f"{served.url}/v1/profiles/batch"
    web = {"X-API-Key": served.keys["web"]}
    cases = [
        ({"purpose": "personalization"}, {"person_ids": ["p"] * 101}, 400, "too_many_ids"),
        ({"purpose": "personalization"}, {"person_ids": []}, 400, "no_ids"),
        ({"purpose": "astrology"}, {"person_ids": ["p"]}, 400, "unknown_purpose"),
        ({"purpose": "analytics"}, {"person_ids": ["p"]}, 403, "purpose_not_bound"),
        (
            {"purpose": "personalization", "traits": ","},
            {"person_ids": ["p"]},
            400,
            "invalid_traits",
        ),
    ]
    for params, body, status, error in cases:
        response = httpx.post(url, params=params, json=body, headers=web)
        assert (response.status_code, response.json()["error"]) == (status, error), error


def test_trait_selection_keeps_only_the_named_traits(served):
    person = _profile(served)["person_id"]
    selected = served.get(f"/v1/profiles/{person}", traits="lifetime_value,first_name").json()
    assert selected["computed"] == {"lifetime_value": {"USD": 42.5}}
    assert list(selected["traits"]) == ["first_name"]
    assert selected["identifiers"] == _profile(served)["identifiers"]


def test_etags_answer_304_for_an_unchanged_profile(served):
    person = _profile(served)["person_id"]
    first = served.get(f"/v1/profiles/{person}")
    tag = first.headers["etag"]
    again = httpx.get(
        f"{served.url}/v1/profiles/{person}",
        params={"purpose": "personalization"},
        headers={"X-API-Key": served.keys["web"], "If-None-Match": tag},
    )
    assert again.status_code == 304 and again.content == b""
    other = httpx.get(
        f"{served.url}/v1/profiles/{person}",
        params={"purpose": "personalization", "traits": "order_count"},
        headers={"X-API-Key": served.keys["web"], "If-None-Match": tag},
    )
    assert other.status_code == 200 and other.headers["etag"] != tag


def test_lookup_by_type_colon_value(served):
    profile = served.get("/v1/profiles/by-identifier/email:ada@example.org").json()
    assert profile == _profile(served)
    bad = served.get("/v1/profiles/by-identifier/ada@example.org")
    assert (bad.status_code, bad.json()["error"]) == (400, "invalid_identifier_format")
    bad = served.get("/v1/profiles/by-identifier/email:not-an-email")
    assert (bad.status_code, bad.json()["error"]) == (400, "invalid_identifier")


def test_segment_members_need_the_segments_purpose(served):
    listed = served.get("/v1/segments", "web").json()["segments"]
    assert any(s["name"] == "repeat_buyers" and s["purpose"] == "marketing" for s in listed)
    page = served.get("/v1/segments/repeat_buyers/members", "admin").json()
    assert page == {
        "segment": "repeat_buyers",
        "purpose": "marketing",
        "total": 0,
        "members": [],
        "next_cursor": None,
    }
    denied = served.get("/v1/segments/repeat_buyers/members", "web")  # bound to personalization
    assert (denied.status_code, denied.json()["error"]) == (403, "purpose_not_bound")
    unknown = served.get("/v1/segments/nope/members", "admin")
    assert (unknown.status_code, unknown.json()["error"]) == (404, "unknown_segment")


def test_members_pages_through_every_member_once():
    store = ProfileStore(":memory:")
    records = []
    for n in range(25):
        change = {"segment": "repeat_buyers", "person_id": f"p_{n:03d}", "change": "entered"}
        records.append(change | {"at": "2026-10-01T10:00:00+00:00"})
    records.append({"segment": "repeat_buyers", "person_id": "p_007", "change": "exited"})
    store.apply(
        [
            ConsumedRecord(topics.SEGMENT_CHANGES, 0, n, None, orjson.dumps(r))
            for n, r in enumerate(records)
        ]
    )
    seen, cursor = [], None
    while True:
        page, total, cursor = store.members("repeat_buyers", limit=10, after=cursor)
        seen += [m["person_id"] for m in page]
        if cursor is None:
            break
    store.close()
    assert total == 24
    assert seen == [f"p_{n:03d}" for n in range(25) if n != 7]


def test_openapi_publishes_every_read(served):
    paths = httpx.get(f"{served.url}/openapi.json").json()["paths"]
    for path in (
        "/v1/profiles/batch",
        "/v1/profiles/by-identifier/{identifier}",
        "/v1/segments/{name}/members",
        "/v1/profiles/{person_id}",
    ):
        assert path in paths


def test_batch_bodies_the_fast_path_refuses_get_fastapis_own_answer(served):
    url = f"{served.url}/v1/profiles/batch"
    params = {"purpose": "personalization"}
    person = _profile(served)["person_id"]

    def post(body: bytes, content_type: str | None) -> httpx.Response:
        headers = {"X-API-Key": served.keys["web"]}
        if content_type:
            headers["Content-Type"] = content_type
        return httpx.post(url, params=params, content=body, headers=headers)

    good = orjson.dumps({"person_ids": [person]})
    fast = post(good, "application/json")
    assert fast.status_code == 200 and fast.json()["profiles"][person]["person_id"] == person
    # Another spelling of JSON goes through FastAPI's reading, to the same answer.
    assert post(good, "application/json; charset=utf-8").json() == fast.json()
    refused = [
        (good, "text/plain", "model_attributes_type", ["body"]),
        (good, None, "model_attributes_type", ["body"]),
        (b'{"person_ids": [1]}', "application/json", "string_type", ["body", "person_ids", 0]),
        (b'{"person_ids": "p"}', "application/json", "list_type", ["body", "person_ids"]),
        (b"{}", "application/json", "missing", ["body", "person_ids"]),
        (b"", "application/json", "missing", ["body"]),
        (b'{"person_ids": [', "application/json", "json_invalid", ["body", 16]),
    ]
    for body, content_type, kind, loc in refused:
        response = post(body, content_type)
        assert response.status_code == 422, body
        (error,) = response.json()["detail"]
        assert (error["type"], error["loc"]) == (kind, loc), body
