"""Reason codes: why an event was rejected. Stable strings; dashboards and DLQ replays key on them."""

from enum import StrEnum


class ReasonCode(StrEnum):
    """Every way an input event can fail its contract or its quality suite. The first is primary."""

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
    INVALID_PRIVACY_REQUEST = "invalid_privacy_request"
    SUBJECT_ERASED = "subject_erased"
    # Quality suites (quality/suites.py): the event is well-formed but its content is wrong.
    TIMESTAMP_IN_FUTURE = "timestamp_in_future"
    TIMESTAMP_TOO_OLD = "timestamp_too_old"
    NEGATIVE_AMOUNT = "negative_amount"
    UNKNOWN_CURRENCY = "unknown_currency"
    PLACEHOLDER_EMAIL = "placeholder_email"
    INVALID_EMAIL = "invalid_email"
    INVALID_PHONE = "invalid_phone"
    REFUND_CURRENCY_MISMATCH = "refund_currency_mismatch"
    REFUND_EXCEEDS_ORDER = "refund_exceeds_order"
    INVALID_SCORE = "invalid_score"
    # The pipeline itself: a stage raised on this event alone; replay it once fixed.
    INTERNAL_ERROR = "internal_error"


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
    ReasonCode.INVALID_PRIVACY_REQUEST: "a privacy request that does not match its contract",
    ReasonCode.SUBJECT_ERASED: "a sealed event whose subject was erased: its key is gone",
    ReasonCode.TIMESTAMP_IN_FUTURE: "the event time is later than now plus the allowed clock skew",
    ReasonCode.TIMESTAMP_TOO_OLD: "the event time is older than the accepted horizon",
    ReasonCode.NEGATIVE_AMOUNT: "an order or refund amount is below zero",
    ReasonCode.UNKNOWN_CURRENCY: "the currency is not an ISO 4217 code",
    ReasonCode.PLACEHOLDER_EMAIL: "an email field holds a placeholder such as 'n/a' or test@test.com",
    ReasonCode.INVALID_EMAIL: "an email field is present but is not an email address",
    ReasonCode.INVALID_PHONE: "a phone field is present but is not a valid phone number",
    ReasonCode.REFUND_CURRENCY_MISMATCH: "a refund's currency differs from its known order's",
    ReasonCode.REFUND_EXCEEDS_ORDER: "a refund's amount is larger than its known order's total",
    ReasonCode.INVALID_SCORE: "a CSAT score is outside 1 to 5",
    ReasonCode.INTERNAL_ERROR: "a pipeline stage failed on this event alone (a bug: replay once fixed)",
}

# Reasons the quality suites give; the others come from the contract stage.
QUALITY_REASONS = frozenset(
    {
        ReasonCode.DUPLICATE_EVENT_ID,
        ReasonCode.TIMESTAMP_IN_FUTURE,
        ReasonCode.TIMESTAMP_TOO_OLD,
        ReasonCode.NEGATIVE_AMOUNT,
        ReasonCode.UNKNOWN_CURRENCY,
        ReasonCode.PLACEHOLDER_EMAIL,
        ReasonCode.INVALID_EMAIL,
        ReasonCode.INVALID_PHONE,
        ReasonCode.REFUND_CURRENCY_MISMATCH,
        ReasonCode.REFUND_EXCEEDS_ORDER,
        ReasonCode.INVALID_SCORE,
    }
)
