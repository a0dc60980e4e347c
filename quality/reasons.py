"""Reason codes: why an event was rejected. Stable strings; dashboards and DLQ replays key on them."""

from enum import StrEnum


class ReasonCode(StrEnum):
    """Every way an input event can fail its contract. The first failing check is primary."""

    PAYLOAD_TOO_LARGE = "payload_too_large"
    EMPTY_PAYLOAD = "empty_payload"
    INVALID_UTF8 = "invalid_utf8"
    MALFORMED_JSON = "malformed_json"
    NOT_AN_OBJECT = "not_an_object"
    TOO_DEEPLY_NESTED = "too_deeply_nested"
    UNKNOWN_EVENT_TYPE = "unknown_event_type"
    UNKNOWN_SCHEMA_VERSION = "unknown_schema_version"
    MISSING_REQUIRED_FIELD = "missing_required_field"
    WRONG_TYPE = "wrong_type"
    INVALID_VALUE = "invalid_value"
    INVALID_TIMESTAMP = "invalid_timestamp"
    MISSING_IDENTIFIER = "missing_identifier"
    DUPLICATE_EVENT_ID = "duplicate_event_id"
    INVALID_COMMAND = "invalid_command"


REASON_DESCRIPTIONS: dict[ReasonCode, str] = {
    ReasonCode.PAYLOAD_TOO_LARGE: "the message is larger than the contract's size limit",
    ReasonCode.EMPTY_PAYLOAD: "the message has no bytes",
    ReasonCode.INVALID_UTF8: "the message is not valid UTF-8",
    ReasonCode.MALFORMED_JSON: "the message is not parseable JSON",
    ReasonCode.NOT_AN_OBJECT: "the JSON document is not an object",
    ReasonCode.TOO_DEEPLY_NESTED: "the JSON document nests deeper than the contract allows",
    ReasonCode.UNKNOWN_EVENT_TYPE: "no contract exists for this event type",
    ReasonCode.UNKNOWN_SCHEMA_VERSION: "no contract exists for this schema version",
    ReasonCode.MISSING_REQUIRED_FIELD: "a field the contract requires is absent",
    ReasonCode.WRONG_TYPE: "a field has the wrong JSON type",
    ReasonCode.INVALID_VALUE: "a field's value is outside what the contract allows",
    ReasonCode.INVALID_TIMESTAMP: "the timestamp is not a real point in time",
    ReasonCode.MISSING_IDENTIFIER: "the event names nobody: no user id, anonymous id, email or phone",
    ReasonCode.DUPLICATE_EVENT_ID: "another event with different content already used this messageId",
    ReasonCode.INVALID_COMMAND: "an operator command that is malformed or names unknown records",
}
