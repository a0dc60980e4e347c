"""Quality metrics: one record per batch for `tessera.quality.reports`, and GX result summaries.

The record is keyed by the batch's input positions, so a batch replayed after a crash
replaces its own record in every replica instead of counting twice.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

import orjson

from quality.suites import QualityVerdict


def suite_summary(outcomes: list[Any]) -> dict[str, Any]:
    """A suite's GX expectation results as plain JSON: success and each one's figures."""
    expectations = []
    for outcome in outcomes:
        kwargs = outcome.expectation_config.kwargs
        expectations.append(
            {
                "type": outcome.expectation_config.type,
                "column": kwargs.get("column") or kwargs.get("column_A"),
                "success": bool(outcome.success),
                "element_count": outcome.result.get("element_count"),
                "unexpected_count": outcome.result.get("unexpected_count"),
                "unexpected_percent": outcome.result.get("unexpected_percent"),
                "partial_unexpected_list": [
                    str(v)[:64] for v in (outcome.result.get("partial_unexpected_list") or [])[:5]
                ],
            }
        )
    return {"success": all(e["success"] for e in expectations), "expectations": expectations}


def batch_key(positions: Sequence[tuple[str, int, int]]) -> str:
    """A stable id for a batch: the first and last offset it read per partition."""
    spans: dict[tuple[str, int], list[int]] = {}
    for topic, partition, offset in positions:
        span = spans.get((topic, partition))
        if span is None:
            spans[(topic, partition)] = [offset, offset]
        elif offset < span[0]:
            span[0] = offset
        elif offset > span[1]:
            span[1] = offset
    text = ";".join(f"{t}/{p}:{lo}-{hi}" for (t, p), (lo, hi) in sorted(spans.items()))
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def batch_quality_record(
    positions: Sequence[tuple[str, int, int]],
    rejected: Sequence[tuple[str, str]],
    verdict: QualityVerdict,
) -> tuple[bytes, bytes]:
    """The quality report of one batch as (key, JSON value).

    In: the (topic, partition, offset) of every event the batch decided, the (source topic,
    primary reason) of each rejection (contract and quality), and the suites' verdict.
    """
    key = batch_key(positions)
    counts = Counter(rejected)
    doc = {
        "batch": key,
        "checked_at": verdict.checked_at.isoformat() if verdict.checked_at else None,
        "events": len(positions),
        "rows_checked": dict(sorted(verdict.rows_by_source.items())),
        "rejected": [
            {"topic": topic, "reason": reason, "count": n}
            for (topic, reason), n in sorted(counts.items())
        ],
        "alerts": [alert.as_dict() for alert in verdict.alerts],
        "gx_seconds": round(verdict.seconds, 4),
        "suites": {name: suite_summary(outcomes) for name, outcomes in verdict.results.items()},
    }
    return key.encode(), orjson.dumps(doc)
