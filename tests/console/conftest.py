"""A running stack holding one known person of three identity records, and one dead letter."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest

from pipelines.produce import produce_events

US = {"location": {"country": "US"}}  # opt-out jurisdiction: every purpose granted by default
# A device's page view, then a login on that device (user id, email), then an order: three
# identity records chained by a shared anonymous id and a shared user id.
FIRST = [
    {
        "type": "page",
        "messageId": "console-1",
        "timestamp": "2026-10-01T10:00:00Z",
        "anonymousId": "dev-console",
        "context": US,
    }
]
THEN = [
    {
        "type": "identify",
        "messageId": "console-2",
        "timestamp": "2026-10-01T10:01:00Z",
        "userId": "u-console",
        "anonymousId": "dev-console",
        "traits": {"email": "Cy@Example.org", "first_name": "Cy"},
        "context": US,
    },
    {
        "type": "track",
        "messageId": "console-3",
        "timestamp": "2026-10-01T10:02:00Z",
        "userId": "u-console",
        "event": "Order Completed",
        "properties": {"order_id": "o-console", "total": 12.5, "currency": "USD"},
        "context": US,
    },
]
GARBAGE = b"<script>alert('not json')</script>"


def wait_for(check, timeout: float = 90, every: float = 0.5):
    """Poll `check` until it returns something truthy; fail with its last value."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"gave up after {timeout} s; last value {value!r}")


@dataclass
class Scenario:
    """The stack, its keys (admin, auditor, web) and the known person's id."""

    stack: Any
    keys: dict[str, str]
    person_id: str
    garbage: bytes = GARBAGE
    wait_for = staticmethod(wait_for)

    def get(self, path: str, key: str | None = "admin", **params: Any) -> httpx.Response:
        headers = {"X-API-Key": self.keys[key]} if key else {}
        return httpx.get(f"{self.stack.api_url}{path}", params=params, headers=headers, timeout=30)

    def post(self, path: str, body: dict, key: str = "admin") -> httpx.Response:
        headers = {"X-API-Key": self.keys[key]}
        return httpx.post(f"{self.stack.api_url}{path}", json=body, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def scenario(stack) -> Scenario:
    produce_events([orjson.dumps(e) for e in FIRST], stack.bootstrap)
    received = lambda: httpx.get(f"{stack.api_url}/v1/stats").json()["received"]  # noqa: E731
    wait_for(lambda: received() >= 1)
    produce_events([orjson.dumps(e) for e in THEN] + [GARBAGE], stack.bootstrap)
    wait_for(lambda: received() >= 4)
    found = Scenario(stack, stack.keys, "")
    profile = wait_for(
        lambda: (
            (
                r := found.get(
                    "/v1/profiles/lookup",
                    type="user_id",
                    value="u-console",
                    purpose="personalization",
                )
            ).status_code
            == 200
            and r.json()
        )
    )
    found.person_id = profile["person_id"]
    wait_for(lambda: len(found.get(f"/v1/identity/{found.person_id}/explain").json()["links"]) == 2)
    return found
