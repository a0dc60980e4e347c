"""The profile API over a real socket, on a store materialised from pipeline outputs."""

import httpx
import pytest


def test_lookup_by_any_identifier_returns_the_same_unified_profile(served):
    by_email = served.get("/v1/profiles/lookup", type="email", value=" ADA@example.org")
    by_phone = served.get("/v1/profiles/lookup", type="phone", value="+14155552671")
    by_device = served.get("/v1/profiles/lookup", type="anonymous_id", value="dev-1")
    assert by_email.status_code == by_phone.status_code == by_device.status_code == 200
    profile = by_email.json()
    assert by_phone.json() == profile == by_device.json()
    assert profile["purpose"] == "personalization"
    assert profile["identifiers"]["anonymous_id"] == ["dev-1", "dev-2"]
    assert profile["computed"]["order_count"] == 1
    assert served.get(f"/v1/profiles/{profile['person_id']}").json() == profile


def test_a_merged_away_person_id_still_resolves_to_the_survivor(served):
    profile = served.get("/v1/profiles/lookup", type="user_id", value="u-7").json()
    (old,) = profile["merged_from"]
    assert served.get(f"/v1/profiles/{old}").json()["person_id"] == profile["person_id"]


def test_stats_account_for_every_event(served):
    stats = httpx.get(f"{served.url}/v1/stats").json()
    assert stats["received"] == 5
    assert (stats["applied"], stats["rejected"], stats["withheld"]) == (4, 1, 0)
    assert stats["rejected_by_reason"] == {"malformed_json": 1}
    assert stats["persons"] == 1 and stats["merges"] == 1


@pytest.mark.parametrize(
    ("path", "params", "status", "error"),
    [
        ("/v1/profiles/lookup", {"type": "email", "value": "nobody@x.org"}, 404, "not_found"),
        (
            "/v1/profiles/lookup",
            {"type": "shoe_size", "value": "9"},
            400,
            "unknown_identifier_type",
        ),
        (
            "/v1/profiles/lookup",
            {"type": "email", "value": "not-an-email"},
            400,
            "invalid_identifier",
        ),
        ("/v1/profiles/p_does_not_exist", {}, 404, "not_found"),
        ("/v1/profiles/" + "x" * 200, {}, 400, "invalid_person_id"),
        # Hostile ids on the hot route: a quote inside the keyed query, a control character.
        ("/v1/profiles/p_x' OR '1'='1", {}, 404, "not_found"),
        ("/v1/profiles/p_%00x", {}, 404, "not_found"),
        ("/v1/profiles/p_x", {"purpose": ""}, 400, "purpose_required"),
    ],
)
def test_clear_errors(served, path, params, status, error):
    response = served.get(path, "admin", **params)
    assert response.status_code == status
    assert response.json()["error"] == error


def test_health_and_openapi(served):
    assert httpx.get(f"{served.url}/healthz").json() == {"status": "ok"}
    assert "/v1/profiles/lookup" in httpx.get(f"{served.url}/openapi.json").json()["paths"]


def test_explain_shows_the_records_and_the_links_that_hold_a_person(served):
    profile = served.get("/v1/profiles/lookup", type="user_id", value="u-7").json()
    body = served.get(f"/v1/identity/{profile['person_id']}/explain", "auditor").json()
    assert body["person_id"] == profile["person_id"]
    assert len(body["records"]) == 4  # page device, identify, order, the merging identify
    rules = {(link["kind"], link["rule"]) for link in body["links"]}
    assert ("merge", "shared:anonymous_id") in rules
    assert ("record_linked", "shared:user_id") in rules
    assert {h["kind"] for h in body["history"]} >= {"person_created", "merge"}
    (old,) = profile["merged_from"]
    moved = served.get(f"/v1/identity/{old}/explain", "admin").json()
    assert moved["person_id"] == profile["person_id"]
    assert served.get("/v1/identity/p_nobody/explain", "admin").status_code == 404
    by_rule = served.get("/v1/stats", "admin").json()["identity_links_by_rule"]
    assert by_rule["shared:anonymous_id"] == 1 and by_rule["shared:user_id"] >= 1


def test_rejecting_a_link_needs_a_command_channel_and_a_valid_body(served):
    ok = {"record_a": "r_1", "record_b": "r_2", "reason": "twins"}
    admin = {"X-API-Key": served.keys["admin"]}
    url = f"{served.url}/v1/identity/links/reject"
    assert httpx.post(url, json=ok, headers=admin).status_code == 503
    assert httpx.post(url, json={"record_a": "r"}, headers=admin).status_code == 422


@pytest.mark.parametrize(
    ("path", "key", "params", "status", "error"),
    [
        ("/v1/profiles/lookup", None, {"type": "user_id", "value": "u-7"}, 401, "unauthenticated"),
        ("/v1/identity/p_x/explain", None, {}, 401, "unauthenticated"),
        # A reader bound to analytics asks for personalization: its purpose is not bound.
        (
            "/v1/profiles/lookup",
            "bi",
            {"type": "user_id", "value": "u-7", "purpose": "personalization"},
            403,
            "purpose_not_bound",
        ),
        # Auditors audit; they do not read profiles. Readers do not explain identities.
        ("/v1/profiles/p_x", "auditor", {}, 403, "forbidden"),
        ("/v1/identity/p_x/explain", "web", {}, 403, "forbidden"),
        ("/v1/profiles/p_x", "web", {"purpose": "astrology"}, 400, "unknown_purpose"),
    ],
)
def test_keys_and_roles(served, path, key, params, status, error):
    response = served.get(path, key, **params)
    assert response.status_code == status
    assert response.json()["error"] == error


def test_an_invalid_key_is_401_and_a_link_rejection_needs_an_admin(served):
    response = httpx.get(
        f"{served.url}/v1/profiles/p_x",
        params={"purpose": "personalization"},
        headers={"X-API-Key": served.keys["admin"] + "x"},
    )
    assert response.status_code == 401
    ok = {"record_a": "r_1", "record_b": "r_2", "reason": "twins"}
    rejected = httpx.post(
        f"{served.url}/v1/identity/links/reject",
        json=ok,
        headers={"X-API-Key": served.keys["auditor"]},
    )
    assert rejected.status_code == 403


def test_keys_are_stored_hashed(served, tmp_path):
    text = (tmp_path / "keys.yaml").read_text()
    assert all(secret not in text for secret in served.keys.values())
