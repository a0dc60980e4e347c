"""Operator commands to the identity stage, carried on `tessera.identity.commands`.

The worker owns the identity store, so an operator's decision (these two records are not
one person) travels to it as a message like any input, in order, and is re-applied when
a worker rebuilds from the topics.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import orjson

from pipelines import topics
from schemas.contract import parse_timestamp

if TYPE_CHECKING:
    from pipelines.pipeline import OutRecord

MAX_REASON = 500


@dataclass(frozen=True)
class RejectLink:
    """Two records an operator says are not one person."""

    command_id: str
    record_a: str
    record_b: str
    reason: str
    operator: str
    requested_at: datetime


def reject_link_command(record_a: str, record_b: str, reason: str, operator: str) -> OutRecord:
    """The message that asks the worker to split two records and never link them again."""
    from pipelines.pipeline import OutRecord

    body = {
        "command": "reject_link",
        "command_id": str(uuid.uuid4()),
        "record_a": record_a,
        "record_b": record_b,
        "reason": reason[:MAX_REASON],
        "operator": operator[:128],
        "requested_at": datetime.now(UTC).isoformat(),
    }
    return OutRecord(topics.IDENTITY_COMMANDS, body["command_id"].encode(), orjson.dumps(body))


def parse_command(raw: bytes) -> RejectLink | str:
    """A command from its bytes, or the reason it is not one (for the dead-letter topic)."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "not JSON"
    if not isinstance(doc, dict) or doc.get("command") != "reject_link":
        return "unknown command; expected {'command': 'reject_link', ...}"
    fields = {}
    for name in ("command_id", "record_a", "record_b", "reason", "operator", "requested_at"):
        value = doc.get(name)
        if not isinstance(value, str) or not value or len(value) > MAX_REASON:
            return f"{name} must be a non-empty string of at most {MAX_REASON} characters"
        fields[name] = value
    when = parse_timestamp(fields.pop("requested_at"))
    if when is None:
        return "requested_at is not a timestamp"
    if fields["record_a"] == fields["record_b"]:
        return "record_a and record_b are the same record"
    return RejectLink(requested_at=when, **fields)
