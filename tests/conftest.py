"""Shared fixtures: event factories and a running local stack for broker-backed tests."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipelines.pipeline import OutRecord, Pipeline, SourceRecord
from pipelines.stack import LocalStack
from profiles.access import KEYS_ENV, write_keyring

TEST_KEYS = [
    {"name": "admin", "role": "admin"},
    {"name": "auditor", "role": "auditor"},
    {"name": "web", "role": "reader", "purposes": ["personalization"]},
]

_ids = itertools.count(1)


@pytest.fixture
def make_event() -> Callable[..., dict[str, Any]]:
    """Build a valid Segment-spec event; keyword arguments override fields."""

    def make(type: str = "page", **fields: Any) -> dict[str, Any]:
        event: dict[str, Any] = {
            "type": type,
            "messageId": f"msg-{next(_ids)}",
            "timestamp": "2026-10-01T10:00:00Z",
        }
        if type in ("page", "screen", "identify", "track") and not (
            {"userId", "anonymousId"} & fields.keys()
        ):
            event["anonymousId"] = f"anon-{next(_ids)}"
        event.update(fields)
        return event

    return make


class PipelineRun:
    """A Pipeline in a temp DuckDB file, fed like an engine feeds it, keeping every output."""

    def __init__(self, path: Path) -> None:
        self.pipeline = Pipeline(path)
        self.outputs: list[OutRecord] = []
        self.offset = itertools.count()

    def feed(self, *events: dict[str, Any] | bytes, topic: str = "tessera.events.behavioral"):
        batch = [
            SourceRecord(
                topic, 0, next(self.offset), e if isinstance(e, bytes) else orjson.dumps(e)
            )
            for e in events
        ]
        return self.pipeline.process(batch, self.outputs.extend)

    @classmethod
    @contextmanager
    def of_batches(cls, path: Path, batches: list[list[dict[str, Any]]]) -> Iterator[Pipeline]:
        """The pipeline of a fresh run at `path` that took every batch; closed on exit."""
        fresh = cls(path)
        try:
            for batch in batches:
                fresh.feed(*batch)
            yield fresh.pipeline
        finally:
            fresh.pipeline.close()

    def on(self, topic: str) -> list[OutRecord]:
        return [o for o in self.outputs if o.topic == topic]

    def latest_documents(self) -> dict[str, dict[str, Any]]:
        """The latest changelog document per person (all views), tombstoned ones left out."""
        latest: dict[str, dict[str, Any] | None] = {}
        for record in self.on("tessera.profiles.changelog"):
            latest[record.key.decode()] = orjson.loads(record.value) if record.value else None
        return {k: v for k, v in latest.items() if v is not None}

    def latest_profiles(self, purpose: str = "subject_access") -> dict[str, dict[str, Any]]:
        """The latest profiles as read for `purpose` (default: everything held)."""
        return {
            person: {
                "person_id": doc["person_id"],
                "merged_from": doc["merged_from"],
                "version": doc["version"],
                **doc["views"][purpose],
            }
            for person, doc in self.latest_documents().items()
            if purpose in doc["views"]
        }


@pytest.fixture
def run(tmp_path: Path) -> Iterator[PipelineRun]:
    runner = PipelineRun(tmp_path / "state.duckdb")
    yield runner
    runner.pipeline.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A real embedded broker, worker process and API process on loopback ports.

    The API reads its keys from a file made here; `stack.keys` maps admin, auditor and
    web (a personalization reader) to their secrets.
    """
    data_dir = tmp_path_factory.mktemp("stack")
    keys = write_keyring(data_dir / "api-keys.yaml", TEST_KEYS)
    previous = os.environ.get(KEYS_ENV)
    os.environ[KEYS_ENV] = str(data_dir / "api-keys.yaml")  # the API process inherits it
    try:
        with LocalStack(data_dir) as running:
            running.keys = keys  # type: ignore[attr-defined]
            yield running
    finally:
        if previous is None:
            os.environ.pop(KEYS_ENV, None)
        else:
            os.environ[KEYS_ENV] = previous
