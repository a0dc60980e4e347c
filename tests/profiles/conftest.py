"""Shared fixtures for profile API tests: a replica store served over a real socket."""

import threading
import time
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

from pipelines.broker import free_port
from profiles.access import load_keyring, write_keyring
from profiles.api import create_app
from profiles.store import ConsumedRecord, ProfileStore

US = {"location": {"country": "US"}}  # opt-out jurisdiction: every purpose granted by default


@dataclass
class Served:
    url: str
    run: object
    keys: dict[str, str]
    store: ProfileStore
    applied: int  # pipeline outputs the store holds

    def catch_up(self) -> None:
        """Apply the pipeline's outputs the store has not seen yet, as the follower would."""
        self.store.apply(
            [
                ConsumedRecord(o.topic, 0, offset, o.key, o.value, o.headers)
                for offset, o in enumerate(self.run.outputs)
                if offset >= self.applied
            ]
        )
        self.applied = len(self.run.outputs)

    def get(self, path: str, key: str | None = "web", **params):
        headers = {"X-API-Key": self.keys[key]} if key else {}
        if path.startswith("/v1/profiles") and "purpose" not in params:
            params["purpose"] = "personalization"
        return httpx.get(f"{self.url}{path}", params=params, headers=headers)


@pytest.fixture
def served(tmp_path, run, make_event):
    run.feed(
        make_event(
            "page",
            anonymousId="dev-1",
            context={"location": {"country": "US"}},
            timestamp="2026-09-01T08:00:00Z",
        )
    )
    run.feed(
        make_event(
            "identify",
            userId="u-7",
            anonymousId="dev-2",
            traits={"email": "Ada@Example.org", "phone": "+1 415 555 2671", "first_name": "Ada"},
            context=US,
        ),
        make_event(
            "track",
            event="Order Completed",
            userId="u-7",
            properties={"order_id": "o1", "total": 42.5, "currency": "USD"},
            context=US,
        ),
    )
    # A later batch: both persons exist by now, so this merges them (within one batch the
    # new records would simply have joined the older person).
    run.feed(
        make_event("identify", userId="u-7", anonymousId="dev-1", context=US),
        b"not even json",
    )
    store = ProfileStore(tmp_path / "replica.duckdb")
    store.apply(
        [
            ConsumedRecord(o.topic, 0, offset, o.key, o.value, o.headers)
            for offset, o in enumerate(run.outputs)
        ]
    )
    keys = write_keyring(
        tmp_path / "keys.yaml",
        [
            {"name": "admin", "role": "admin"},
            {"name": "auditor", "role": "auditor"},
            {"name": "web", "role": "reader", "purposes": ["personalization"]},
            {"name": "bi", "role": "reader", "purposes": ["analytics"]},
        ],
    )
    keyring = load_keyring(tmp_path / "keys.yaml")
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(store, keyring=keyring), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield Served(f"http://127.0.0.1:{port}", run, keys, store, len(run.outputs))
    server.should_exit = True
    thread.join(5)
    store.close()
