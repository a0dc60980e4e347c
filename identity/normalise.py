"""Identifier normalisation: the same person's identifiers written different ways become one value.

Emails are trimmed and lower-cased; phones become E.164 through libphonenumber (national
formats need a region hint from the event); ids are trimmed. Placeholder values that many
unrelated people type ("n/a", "test@test.com") are never identifiers.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from typing import Any, NamedTuple

import phonenumbers

ID_TYPES = ("user_id", "anonymous_id", "email", "phone")

_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]{2,}$")
BLOCKED_EMAILS = frozenset(
    {
        "test@test.com",
        "test@example.com",
        "a@a.com",
        "noreply@example.com",
        "no-reply@example.com",
        "none@none.com",
        "email@email.com",
        "null@null.com",
    }
)
BLOCKED_IDS = frozenset({"", "null", "none", "undefined", "nan", "0", "n/a", "anonymous", "guest"})
# Device ids that many unrelated devices report: the all-zero advertising id of a phone
# with ad tracking limited, emulator and placeholder ids.
BLOCKED_DEVICE_IDS = frozenset(
    {
        "00000000-0000-0000-0000-000000000000",
        "0000000000000000",
        "unknown",
        "emulator",
        "9774d56d682e549c",  # the Android id of many Android 2.2 devices
    }
)


class Identifier(NamedTuple):
    """A normalised identifier: its type (one of ID_TYPES) and value."""

    type: str
    value: str


def identifier_hash(identifier: Identifier) -> str:
    """A non-reversible handle for an identifier, safe to publish in lineage and link events."""
    digest = hashlib.sha256(f"{identifier.type}:{identifier.value}".encode()).hexdigest()
    return f"{identifier.type}:{digest[:16]}"


def normalise_email(value: Any) -> str | None:
    """A lower-cased, trimmed email, or None when it is not an email or is a placeholder."""
    return _email(value) if isinstance(value, str) else None


@lru_cache(maxsize=65536)  # a stream repeats its persons' emails, each in a few spellings
def _email(text: str) -> str | None:
    email = text.strip().lower()
    if not _EMAIL.match(email) or email in BLOCKED_EMAILS:
        return None
    return email


def normalise_phone(value: Any, region: str | None = None) -> str | None:
    """A phone number in E.164 form, or None when it is not a valid number.

    `region` (ISO 3166 alpha-2) lets national formats such as "030 1234567" parse.
    """
    if not isinstance(value, str) or not value.strip() or len(value) > 64:
        return None
    return _parse_phone(value, region)


@lru_cache(maxsize=65536)  # the same few numbers recur in every batch; parsing costs ~50 µs
def _parse_phone(value: str, region: str | None) -> str | None:
    try:
        number = phonenumbers.parse(value, region.upper() if region else None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalise_id(value: Any) -> str | None:
    """A trimmed opaque id, or None when empty or a placeholder."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    return None if text.lower() in BLOCKED_IDS else text


def normalise_device_id(value: Any) -> str | None:
    """A device or advertising id trimmed and lower-cased (IDFA and GAID are
    case-insensitive UUIDs), or None when empty or a value many devices share."""
    text = normalise_id(value)
    if text is None:
        return None
    text = text.lower()
    return None if text in BLOCKED_DEVICE_IDS or not text.strip("0-") else text


def parse_identifier(id_type: str, value: str, region: str | None = None) -> Identifier | None:
    """Normalise one identifier given as type and raw value (as an API caller gives it)."""
    normaliser = {
        "email": normalise_email,
        "phone": lambda v: normalise_phone(v, region),
        "user_id": normalise_id,
        "anonymous_id": normalise_id,
    }.get(id_type)
    if normaliser is None:
        return None
    normalised = normaliser(value)
    return Identifier(id_type, normalised) if normalised else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def region_hint(event: dict[str, Any]) -> str | None:
    """The country an event's national phone numbers belong to, if the event says."""
    context = _dict(event.get("context"))
    candidates = [
        _dict(context.get("location")).get("country"),
        _dict(_dict(event.get("traits")).get("address")).get("country"),
        _dict(_dict(context.get("traits")).get("address")).get("country"),
    ]
    for country in candidates:
        if isinstance(country, str) and len(country.strip()) == 2:
            return country.strip().upper()
    return None


def extract_identifiers(event: dict[str, Any]) -> list[Identifier]:
    """Every normalised identifier an event carries, without duplicates, in a stable order.

    In: a parsed Segment-spec event. Out: identifiers from userId, anonymousId (and an
    alias's previousId), and email/phone in traits, context.traits and properties.
    """
    # Called once per event (the contract check): the ids' identifiers come from a cache,
    # since a person's events repeat them (1.2 against 2.3 us an event, measured).
    found: dict[Identifier, None] = {}
    user_id, anonymous_id = event.get("userId"), event.get("anonymousId")
    if isinstance(user_id, str) and (identifier := _id_identifier("user_id", user_id)):
        found[identifier] = None
    if isinstance(anonymous_id, str) and (
        identifier := _id_identifier("anonymous_id", anonymous_id)
    ):
        found[identifier] = None
    if event.get("type") == "alias":
        previous = event.get("previousId")
        if isinstance(previous, str) and (identifier := _id_identifier("anonymous_id", previous)):
            found[identifier] = None
    context = event.get("context")
    for source in (
        event.get("traits"),
        context.get("traits") if isinstance(context, dict) else None,
        event.get("properties"),
    ):
        # Most events carry neither: no normalising, no region lookup for them.
        if not isinstance(source, dict):
            continue
        email, phone = source.get("email"), source.get("phone")
        if email is not None and (value := normalise_email(email)):
            found[Identifier("email", value)] = None
        if phone is not None and (value := normalise_phone(phone, region_hint(event))):
            found[Identifier("phone", value)] = None
    return list(found)


@lru_cache(maxsize=65536)
def _id_identifier(id_type: str, value: str) -> Identifier | None:
    """The identifier of a user or anonymous id (`normalise_id`), or None: one shared,
    immutable tuple per id."""
    text = normalise_id(value)
    return Identifier(id_type, text) if text else None
