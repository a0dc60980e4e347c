"""A stage that raises on one event's content must not stall the partition or lose the rest."""

from __future__ import annotations

import orjson
import pytest

from pipelines import topics
from pipelines.pipeline import Pipeline, SourceRecord
from quality.suites import QualityStage


class QualityStageWithABug(QualityStage):
    """The real quality stage, with a bug that fires on one event (fault injection)."""

    def check(self, rows, state):
        if any(row.event.get("messageId") == "poison" for row in rows):
            raise KeyError("a bug that only this event triggers")
        return super().check(rows, state)


def page(message_id: str) -> bytes:
    return orjson.dumps(
        {
            "type": "page",
            "messageId": message_id,
            "userId": f"u-{message_id}",
            "timestamp": "2026-10-30T10:00:00Z",
            "context": {"location": {"country": "US"}},
        }
    )


def test_the_poison_event_is_dead_lettered_and_the_rest_applied(tmp_path):
    raws = [page(f"p{i}") for i in range(9)]
    raws.insert(5, page("poison"))
    batch = [SourceRecord(topics.BEHAVIORAL, 0, n, raw) for n, raw in enumerate(raws)]
    pipeline = Pipeline(tmp_path / "state.duckdb", quality=QualityStageWithABug())
    outputs = []
    report = pipeline.process(batch, outputs.extend)
    assert dict(report.outcomes) == {"applied": 9, "rejected": 1}
    (dead,) = [o for o in outputs if o.topic == topics.REJECTED]
    headers = dict(dead.headers)
    assert dead.value == page("poison")  # original bytes
    assert headers["tessera.reason"] == b"internal_error"
    assert b"KeyError" in headers["tessera.reasons"]
    assert headers["tessera.source.offset"] == b"5"
    assert pipeline.committed_offsets() == {(topics.BEHAVIORAL, 0): 10}  # the partition moves on
    # Once the stage is fixed, re-driving the unchanged bytes processes the event.
    pipeline.quality = QualityStage()
    again = pipeline.process(
        [SourceRecord(topics.BEHAVIORAL, 0, 10, page("poison"))], outputs.extend
    )
    assert dict(again.outcomes) == {"applied": 1}
    pipeline.close()


def test_a_failing_emit_is_not_mistaken_for_a_poison_event(tmp_path):
    pipeline = Pipeline(tmp_path / "state.duckdb", quality=False)

    def broker_down(_outputs):
        raise ConnectionError("broker unreachable")

    batch = [SourceRecord(topics.BEHAVIORAL, 0, 0, page("a"))]
    with pytest.raises(ConnectionError):  # the engine retries the batch; nothing dead-lettered
        pipeline.process(batch, broker_down)
    assert pipeline.committed_offsets() == {}
    outputs = []
    assert dict(pipeline.process(batch, outputs.extend).outcomes) == {"applied": 1}
    pipeline.close()
