"""Identity records: what an event (or a row of a file) says about who its person is.

A record holds normalised identifiers (user_id, anonymous_id, customer_id, email, phone,
and a mobile device's id and advertising id) and personal attributes (names, date of birth, address). Records are content-addressed:
the same normalised content is the same record however many events carry it, so a
person's thousand page views from one device are one record, not a thousand.
"""

from __future__ import annotations

import hashlib
import re
import time
import unicodedata
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Any

from identity.normalise import (
    normalise_device_id,
    normalise_email,
    normalise_id,
    normalise_phone,
    region_hint,
)

# Identifiers that link records deterministically, strongest first: when two of an event's
# identifiers point at different persons, the stronger one decides. Device ids come last:
# a household shares its tablet, so they link but are held to a per-person limit.
STRONG_FIELDS = (
    "user_id",
    "customer_id",
    "email",
    "phone",
    "anonymous_id",
    "device_id",
    "advertising_id",
)
ATTRIBUTE_FIELDS = (
    "first_name",
    "last_name",
    "dob",
    "address_line1",
    "city",
    "postcode",
    "region",
    "country",
)
RECORD_FIELDS = STRONG_FIELDS + ATTRIBUTE_FIELDS
# Fields added after records were first stored: they enter a record's content address
# only when set, so every record stored before keeps its id.
_LATER_FIELDS = ("device_id", "advertising_id")
_ADDRESSED_FIELDS = tuple(f for f in RECORD_FIELDS if f not in _LATER_FIELDS)

_SPACES = re.compile(r"\s+")
_NOT_NAME = re.compile(r"[^a-z' -]")
_ADDRESS_WORDS = {
    "street": "st",
    "str": "st",
    "strasse": "st",
    "road": "rd",
    "avenue": "ave",
    "av": "ave",
    "drive": "dr",
    "lane": "ln",
    "place": "pl",
    "boulevard": "blvd",
    "court": "ct",
}
_EPOCH = date(1970, 1, 1)
_DATE_FORMATS = ("%Y-%m-%d", "%Y%m%d", "%d/%m/%Y", "%d.%m.%Y", "%Y/%m/%d", "%d-%m-%Y")


def fold(text: str) -> str:
    """Lower-case ASCII letters: accents dropped (Zoë -> zoe), compatibility forms unified."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).lower()


def normalise_name(value: Any) -> str | None:
    """A person or place name folded to lower-case ASCII with single spaces, or None."""
    return _name(value) if isinstance(value, str) else None


# The normalisers keep what they made of each text: a stream repeats its persons' names,
# dates and addresses, each in a few spellings.
@lru_cache(maxsize=65536)
def _name(text: str) -> str | None:
    name = _SPACES.sub(" ", _NOT_NAME.sub(" ", fold(text))).strip(" -'")
    return name[:64] or None


def normalise_dob(value: Any, today: date | None = None) -> str | None:
    """A date of birth as YYYY-MM-DD from ISO, YYYYMMDD, DD/MM/YYYY and similar, or None.

    Dates before 1900 or after `today` are not births: they become None.
    """
    if isinstance(value, datetime):
        parsed = value.date()
    elif isinstance(value, date):
        parsed = value
    elif isinstance(value, str):
        parsed = _date(value)
        if parsed is None:
            return None
    else:
        return None
    latest = today or datetime.now(UTC).date()
    if parsed.year < 1900 or parsed > latest:
        return None
    return parsed.isoformat()


@lru_cache(maxsize=65536)
def _date(text: str) -> date | None:
    """The date a text writes in one of `_DATE_FORMATS`, or None."""
    if not 6 <= len(text.strip()) <= 32:
        return None
    text = text.strip()[:10] if "T" in text else text.strip()
    for fmt in _DATE_FORMATS:
        try:
            return datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    return None


def normalise_address(value: Any) -> str | None:
    """A street line folded, with common street words abbreviated (Main Street -> main st)."""
    return _address(value) if isinstance(value, str) else None


@lru_cache(maxsize=65536)
def _address(text: str) -> str | None:
    words = re.sub(r"[^a-z0-9 ]", " ", fold(text)).split()
    text = " ".join(_ADDRESS_WORDS.get(w, w) for w in words)
    return text[:128] or None


def normalise_postcode(value: Any) -> str | None:
    """A postcode upper-cased without spaces or dashes (SW1A 1AA -> SW1A1AA)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    code = re.sub(r"[^0-9A-Za-z]", "", value).upper()
    return code[:16] or None


def normalise_country(value: Any) -> str | None:
    """An ISO 3166 alpha-2 code upper-cased, or None."""
    if not isinstance(value, str):
        return None
    code = value.strip().upper()
    return code if len(code) == 2 and code.isalpha() else None


def record_id_of(fields: dict[str, str | None]) -> str:
    """The content address of a normalised record: equal content, equal id."""
    get = fields.get
    body = "\x1f".join([get(name) or "" for name in _ADDRESSED_FIELDS])
    device_id, advertising_id = (get(name) for name in _LATER_FIELDS)
    if device_id or advertising_id:
        body += f"\x1e{device_id or ''}\x1f{advertising_id or ''}"
    return "r_" + hashlib.blake2b(body.encode(), digest_size=12).hexdigest()


def normalise_record(
    raw: dict[str, Any], region: str | None = None, today: date | None = None
) -> dict[str, str | None]:
    """Every record field normalised from raw values keyed by field name (missing -> None).

    `today`: the date a birth date must not be after (default: today, UTC)."""
    country = normalise_country(raw.get("country"))
    return {
        "user_id": normalise_id(_text(raw.get("user_id"))),
        "customer_id": normalise_id(_text(raw.get("customer_id"))),
        "email": normalise_email(raw.get("email")),
        "phone": normalise_phone(_text(raw.get("phone")), region or country),
        "anonymous_id": normalise_id(_text(raw.get("anonymous_id"))),
        "device_id": normalise_device_id(_text(raw.get("device_id"))),
        "advertising_id": normalise_device_id(_text(raw.get("advertising_id"))),
        "first_name": normalise_name(raw.get("first_name")),
        "last_name": normalise_name(raw.get("last_name")),
        "dob": normalise_dob(raw.get("dob"), today),
        "address_line1": normalise_address(raw.get("address_line1")),
        "city": normalise_name(raw.get("city")),
        "postcode": normalise_postcode(raw.get("postcode")),
        "region": normalise_name(raw.get("region")),
        "country": country,
    }


def _text(value: Any) -> Any:
    # Files give ids and phones as numbers at times; identifiers are text.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(int(value)) if float(value).is_integer() else str(value)
    return value


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _first(*values: Any) -> Any:
    for value in values:
        if value is not None and value != "":
            return value
    return None


# What `record_from_event` picks from traits and properties: per thing stated, the names
# it may go by, tried in this order.
_NAMES = (
    ("customer_id", "customerId"),
    ("email",),
    ("phone",),
    ("first_name", "firstName"),
    ("last_name", "lastName"),
    ("birthday", "dob", "date_of_birth", "dateOfBirth"),
    ("address",),
    ("address_line1",),
    ("city",),
    ("postcode",),
    ("region",),
)
_PICKED = frozenset(name for names in _NAMES for name in names)
_SLOT = {name: (slot, rank) for slot, names in enumerate(_NAMES) for rank, name in enumerate(names)}


def _stated(sources: list[dict[str, Any]]) -> tuple[Any, ...]:
    """What traits and properties state, first found wins: customer id, email, phone,
    first and last name, birth date, then the address's street, city, postcode, region
    and country."""
    found: list[Any] = [None] * len(_NAMES)
    # Each source overwrites what the sources after it stated: the first one wins. Within
    # a source, a thing's first name that holds a value wins.
    for source in reversed(sources):
        ranks: dict[int, int] = {}
        for name in _PICKED.intersection(source):
            value = source[name]
            if value is None or value == "":
                continue
            slot, rank = _SLOT[name]
            if rank < ranks.get(slot, len(_NAMES)):
                ranks[slot] = rank
                found[slot] = value
    customer_id, email, phone, first_name, last_name, dob, address, line1, city, code, region = (
        found
    )
    country = None
    if isinstance(address, dict) and address:
        line1 = _first(address.get("street"), address.get("line1"), line1)
        city = _first(address.get("city"), city)
        code = _first(address.get("postal_code"), address.get("postalCode"), code)
        region = _first(address.get("state"), address.get("region"), region)
        # The address's country only: a request's location says where a device was, not who.
        country = address.get("country")
    return (
        customer_id,
        email,
        phone,
        first_name,
        last_name,
        dob,
        line1,
        city,
        code,
        region,
        country,
    )


def record_from_event(event: dict[str, Any]) -> dict[str, str | None]:
    """The normalised identity record of a Segment-spec event.

    In: a contract-valid event. Out: every RECORD_FIELDS key, None where the event is
    silent. Names, birth date and address come from traits (identify), context.traits
    and properties, first found wins; an alias's previousId is its anonymous id; a mobile
    device's context.device.id and advertisingId are its device ids.
    """
    return identity_record(event)[0]


def identity_record(event: dict[str, Any]) -> tuple[dict[str, str | None], str]:
    """An event's identity record (`record_from_event`) and its id (`record_id_of` it)."""
    context = event.get("context")
    if not isinstance(context, dict):
        context = _NO_CONTEXT
    # Only the sources that name a field: most events state nothing about their person.
    sources = []
    for source in (event.get("traits"), context.get("traits"), event.get("properties")):
        if isinstance(source, dict) and not source.keys().isdisjoint(_PICKED):
            sources.append(source)
    device = context.get("device")
    device_id, advertising_id = (
        (device.get("id"), device.get("advertisingId"))
        if isinstance(device, dict)
        else (None, None)
    )
    anonymous = event.get("anonymousId")
    if event.get("type") == "alias":
        anonymous = _first(event.get("previousId"), anonymous)
    ids = (event.get("userId"), anonymous, device_id, advertising_id)
    stated: tuple[Any, ...] = ()
    region = None
    # A person's events repeat the same raw values: each distinct set is normalised once.
    try:
        if not sources:
            record, record_id = _ids_record(*ids)
        else:
            stated = _stated(sources)
            # The event's region reads only into a phone number, today only into a birth
            # date (a date after it is not one): each is in the key only when stated.
            region = None if stated[2] is None else region_hint(event)
            day = 0 if stated[5] is None else int(time.time() // 86_400)
            record, record_id = _normalised(*ids, region, day, *stated)
    except TypeError:  # a value that cannot be a key (a list, an object): not cached
        raw = dict(zip(_ID_FIELDS, ids, strict=True))
        raw.update(zip(_STATED_FIELDS, stated, strict=False))
        record = normalise_record(raw, region)
        return record, record_id_of(record)
    return record.copy(), record_id


_NO_CONTEXT: dict[str, Any] = {}
# The fields an event's ids give, and those its traits and properties state.
_ID_FIELDS = ("user_id", "anonymous_id", "device_id", "advertising_id")
_STATED_FIELDS = tuple(f for f in RECORD_FIELDS if f not in _ID_FIELDS)


# Typed: 1 and True (or 1.0) are equal keys but not the same identifier.
@lru_cache(maxsize=16384, typed=True)
def _ids_record(
    user_id: Any, anonymous_id: Any, device_id: Any, advertising_id: Any
) -> tuple[dict[str, str | None], str]:
    """The record of an event that states nothing but its ids (`normalise_record` of them)."""
    record: dict[str, str | None] = dict.fromkeys(RECORD_FIELDS)
    record["user_id"] = normalise_id(_text(user_id))
    record["anonymous_id"] = normalise_id(_text(anonymous_id))
    record["device_id"] = normalise_device_id(_text(device_id))
    record["advertising_id"] = normalise_device_id(_text(advertising_id))
    return record, record_id_of(record)


@lru_cache(maxsize=16384, typed=True)
def _stated_record(region: str | None, day: int, *stated: Any) -> dict[str, str | None]:
    """The record of what traits and properties state (`_STATED_FIELDS` in order), ids
    left empty: a person states the same things from each new device."""
    today = _EPOCH + timedelta(days=day)
    return normalise_record(dict(zip(_STATED_FIELDS, stated, strict=True)), region, today)


@lru_cache(maxsize=16384, typed=True)
def _normalised(
    user_id: Any,
    anonymous_id: Any,
    device_id: Any,
    advertising_id: Any,
    region: str | None,
    day: int,
    *stated: Any,
) -> tuple[dict[str, str | None], str]:
    """The record of an event's ids and statements: each part normalised once (a field
    is normalised from its own raw value alone, a phone with the country too)."""
    record = _stated_record(region, day, *stated).copy()
    ids, _ = _ids_record(user_id, anonymous_id, device_id, advertising_id)
    for name in _ID_FIELDS:
        record[name] = ids[name]
    return record, record_id_of(record)


def has_identity(record: dict[str, str | None]) -> bool:
    """True when a record carries at least one field a person could be found by."""
    return any(record.get(name) for name in STRONG_FIELDS) or bool(
        record.get("last_name") and (record.get("first_name") or record.get("dob"))
    )
