"""Request bodies that are not JSON, on every route that takes one, over a real socket.

Python's own JSON reader accepts NaN, Infinity and unpaired surrogates; a model then
refuses the value and the 422 that would quote it could not be written as JSON (a 500).
"""

from __future__ import annotations

import httpx

# Each is JSON to Python's `json` module and not to RFC 8259; each names a field of some
# body so a lenient reader would pass it on to validation.
NOT_JSON = [
    b'{"person_ids": [NaN]}',
    b'{"person_ids": ["p_1"], "offsets": [Infinity]}',
    b'{"offsets": [-Infinity], "record_a": "r_1"}',
    b'{"person_ids": [1e400], "value": 1e400}',
    b'{"person_ids": ["\\ud800"], "reason": "\\udfff"}',
]
BODY_ROUTES = {
    "/v1/profiles/batch",
    "/v1/identity/links/reject",
    "/v1/privacy/erasures",
    "/v1/dlq/replay",
}


def _body_routes(served) -> list[tuple[str, str]]:
    """(method, path) of every operation whose OpenAPI description takes a request body."""
    paths = httpx.get(f"{served.url}/openapi.json").json()["paths"]
    return sorted(
        (method, path)
        for path, operations in paths.items()
        for method, operation in operations.items()
        if "requestBody" in operation
    )


def test_every_route_with_a_body_answers_what_is_not_json_with_a_422_and_the_reason(served):
    routes = _body_routes(served)
    assert {path for _, path in routes} == BODY_ROUTES  # a new body route is covered here too
    for method, path in routes:
        for body in NOT_JSON:
            response = httpx.request(
                method,
                f"{served.url}{path}",
                params={"purpose": "personalization"},
                content=body,
                headers={"X-API-Key": served.keys["admin"], "Content-Type": "application/json"},
            )
            assert response.status_code == 422, (path, body, response.text)
            (error,) = response.json()["detail"]
            assert error["type"] == "json_invalid", (path, body)
            assert error["loc"][0] == "body" and error["ctx"]["error"], (path, body)


def test_the_reason_names_what_json_lacks(served):
    reasons = {}
    for body in (b'{"person_ids": [NaN]}', b'{"person_ids": [-Infinity]}', b"[1e400]"):
        response = httpx.post(
            f"{served.url}/v1/profiles/batch",
            params={"purpose": "personalization"},
            content=body,
            headers={"X-API-Key": served.keys["web"], "Content-Type": "application/json"},
        )
        assert response.status_code == 422, body
        (error,) = response.json()["detail"]
        reasons[body] = (error["loc"], error["ctx"]["error"])
    assert reasons[b'{"person_ids": [NaN]}'] == (
        ["body", 16],
        "NaN and Infinity are not JSON numbers",
    )
    assert reasons[b'{"person_ids": [-Infinity]}'][1] == "NaN and Infinity are not JSON numbers"
    assert "infinity" in reasons[b"[1e400]"][1]
