"""The seeded synthetic event stream, with the ground truth of every line.

Persons live in households (shared address and last name, sometimes twins, sometimes a
shared tablet), own one to three devices, browse anonymously before they log in, order
in their country's currency, refund, open support tickets by email, phone or chat, and
answer a consent banner (opt-in in the EU), sometimes withdrawing a purpose later.
Identifiers arrive in many spellings (email casing and spaces, phone formats); names
carry typos; a share of lines is malformed, each with exactly one defect; a few valid
lines are re-sent byte for byte.

The truth of a line says who it belongs to and the outcome Tessera must record for it:
applied, rejected (with the primary reason code), withheld (with the purpose), or
duplicate. Outcomes follow the contract order of `schemas.contract` and the purpose
policy of `consent/policy.yaml`, which is read, not copied.
"""

from __future__ import annotations

import csv
import random
import re
import unicodedata
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import phonenumbers

from consent.policy import load_policy
from identity.normalise import normalise_phone, region_hint
from pipelines.topics import route
from quality.suites import EMAIL_PATTERN, PLACEHOLDER_EMAILS

FIRST_NAMES = [
    "Anna",
    "Lukas",
    "Sofia",
    "Mateo",
    "Emma",
    "Noah",
    "Léa",
    "Hugo",
    "Zoë",
    "Liam",
    "Olivia",
    "Elias",
    "Chloé",
    "Jonas",
    "Maria",
    "José",
    "Giulia",
    "Marco",
    "Sven",
    "Ingrid",
    "Aoife",
    "Seán",
    "Fatima",
    "Omar",
    "Mia",
    "Ben",
    "Clara",
    "Paul",
    "Lucía",
    "Pablo",
    "Grace",
    "James",
    "Ava",
    "Ethan",
    "Chiara",
    "Luca",
    "Daan",
    "Sanne",
    "Amélie",
    "Björn",
    "Nina",
    "Tomás",
]
LAST_NAMES = [
    "Müller",
    "Schmidt",
    "García",
    "Martínez",
    "Rossi",
    "Bianchi",
    "Dubois",
    "Lefèvre",
    "de Vries",
    "Jansen",
    "Smith",
    "Jones",
    "Murphy",
    "O'Brien",
    "Johnson",
    "Williams",
    "Brown",
    "Novak",
    "Fernández",
    "Moreau",
    "Weber",
    "Fischer",
    "Romano",
    "Colombo",
    "Bakker",
    "Walsh",
    "Taylor",
    "Davies",
    "López",
    "Sánchez",
    "Wagner",
    "Becker",
    "Ricci",
    "Visser",
    "Kelly",
    "Miller",
]
COUNTRIES = {  # country: (currency, cities)
    "DE": ("EUR", ["Berlin", "München", "Köln"]),
    "FR": ("EUR", ["Paris", "Lyon", "Nantes"]),
    "ES": ("EUR", ["Madrid", "Sevilla", "Valencia"]),
    "IT": ("EUR", ["Roma", "Milano", "Torino"]),
    "NL": ("EUR", ["Amsterdam", "Utrecht", "Rotterdam"]),
    "IE": ("EUR", ["Dublin", "Cork", "Galway"]),
    "GB": ("GBP", ["London", "Leeds", "Bristol"]),
    "US": ("USD", ["Austin", "Denver", "Boston", "Seattle"]),
}
EU_COUNTRIES = ["DE", "FR", "ES", "IT", "NL", "IE", "GB"]
DOMAINS = [
    "gmail.com",
    "outlook.com",
    "yahoo.com",
    "icloud.com",
    "web.de",
    "orange.fr",
    "proton.me",
]
CATEGORIES = ["shoes", "outerwear", "electronics", "books", "home", "beauty", "toys", "garden"]
TRACK_EVENTS = ["Product Viewed", "Added to Cart", "Search", "Wishlist Added", "Video Played"]
PAGES = ["/", "/sale", "/new", "/account", "/cart", "/help"]
CMPS = ["OneTrust", "Didomi", "Usercentrics"]
PURPOSES = ("analytics", "personalization", "marketing", "support")
BEHAVIORAL = ("page", "screen", "track")
# Share of EU persons granting each purpose on the banner.
EU_GRANT = {"analytics": 0.70, "personalization": 0.55, "marketing": 0.35, "support": 1.0}


@dataclass(frozen=True)
class TruthRow:
    """The ground truth of one line of the generated file."""

    line: int
    message_id: str
    person: str
    kind: str
    topic: str
    expected_outcome: str
    expected_reason: str


TRUTH_COLUMNS = [
    "line",
    "message_id",
    "person",
    "kind",
    "topic",
    "expected_outcome",
    "expected_reason",
]


@dataclass
class GenerationSummary:
    """How many lines of each kind and outcome were written."""

    events: int = 0
    persons: int = 0
    by_kind: Counter = field(default_factory=Counter)
    by_outcome: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        outcomes = ", ".join(f"{k} {v:,}" for k, v in sorted(self.by_outcome.items()))
        return f"{self.events:,} events for {self.persons:,} persons: {outcomes}"


@dataclass
class Person:
    key: str
    country: str
    first_name: str
    last_name: str
    birthday: str
    email: str
    phone: str  # E.164
    address: dict[str, str]
    user_id: str | None
    devices: list[str]
    prefs: dict[str, bool]
    tablet: str | None = None
    carries_prefs: bool = True


def mobile_number(country: str, tails: Iterable[str]) -> str:
    """A valid E.164 mobile number of `country`: its example number ending in the first of
    `tails` that makes it valid (the example number itself when none does)."""
    example = phonenumbers.example_number_for_type(country, phonenumbers.PhoneNumberType.MOBILE)
    digits = str(example.national_number)
    for tail in tails:
        candidate = phonenumbers.parse(f"+{example.country_code}{digits[: -len(tail)]}{tail}")
        if phonenumbers.is_valid_number(candidate):
            return phonenumbers.format_number(candidate, phonenumbers.PhoneNumberFormat.E164)
    return phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)


def _ascii(text: str) -> str:
    return "".join(
        c for c in unicodedata.normalize("NFKD", text) if c.isalnum() and c.isascii()
    ).lower()


class _Generator:
    def __init__(self, persons: int, events: int, seed: int, end: datetime) -> None:
        self.rng = random.Random(seed)
        self.n_persons, self.n_events, self.end = persons, events, end
        self.start = end - timedelta(days=30)
        self.policy = load_policy()

    # -- helpers -----------------------------------------------------------------------------

    def uid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def hex(self, n: int) -> str:
        return f"{self.rng.getrandbits(4 * n):0{n}x}"

    def phone_for(self, country: str, index: int) -> str:
        return mobile_number(
            country, (f"{(index * 7919 + attempt * 104729) % 10_000:04d}" for attempt in range(50))
        )

    def typo(self, text: str) -> str:
        """Swap, drop or double one letter (letters only, so digits that make ids unique stay)."""
        letters = [i for i, c in enumerate(text) if c.isalpha()]
        if len(letters) < 3:
            return text
        i = self.rng.choice(letters[:-1])
        move = self.rng.randrange(3)
        if move == 0 and text[i + 1].isalpha():
            return text[:i] + text[i + 1] + text[i] + text[i + 2 :]
        if move == 1:
            return text[:i] + text[i + 1 :]
        return text[:i] + text[i] + text[i:]

    def email_variant(self, email: str) -> str:
        roll = self.rng.random()
        if roll < 0.15:
            return email.upper()
        if roll < 0.3:
            local, domain = email.split("@")
            return f"  {local.capitalize()}@{domain.capitalize()} "
        return email

    def phone_variant(self, e164: str, with_region: bool) -> str:
        number = phonenumbers.parse(e164)
        roll = self.rng.random()
        if roll < 0.35 and with_region:
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
        if roll < 0.7:
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
        return e164

    # -- persons -----------------------------------------------------------------------------

    def make_persons(self) -> list[Person]:
        persons: list[Person] = []
        index = 0
        while index < self.n_persons:
            size = min(self.rng.choice([1, 1, 1, 2, 2, 3, 4]), self.n_persons - index)
            country = self.rng.choice(["US"] * 7 + EU_COUNTRIES)
            last = self.rng.choice(LAST_NAMES)
            city = self.rng.choice(COUNTRIES[country][1])
            address = {
                "street": f"{self.rng.randint(1, 250)} {self.rng.choice(['Main', 'Oak', 'Linden', 'Park', 'Mill'])} Street",
                "city": city,
                "postal_code": f"{self.rng.randint(10000, 99999)}",
                "country": country,
            }
            twins = size >= 2 and self.rng.random() < 0.15
            base_birthday = datetime(
                self.rng.randint(1950, 2005), self.rng.randint(1, 12), self.rng.randint(1, 28)
            )
            household: list[Person] = []
            names = self.rng.sample(FIRST_NAMES, size)
            for member in range(size):
                birthday = (
                    base_birthday
                    if twins and member < 2
                    else datetime(
                        self.rng.randint(1950, 2005),
                        self.rng.randint(1, 12),
                        self.rng.randint(1, 28),
                    )
                )
                first = names[member]
                key = f"P{index:06d}"
                email = f"{_ascii(first)}.{_ascii(last)}{index}@{self.rng.choice(DOMAINS)}"
                eu = country != "US"
                prefs = {p: (self.rng.random() < EU_GRANT[p]) if eu else True for p in PURPOSES}
                person = Person(
                    key=key,
                    country=country,
                    first_name=first,
                    last_name=last,
                    birthday=birthday.strftime("%Y-%m-%d"),
                    email=email,
                    phone=self.phone_for(country, index),
                    address=dict(address),
                    user_id=f"u_{self.hex(12)}" if self.rng.random() < 0.85 else None,
                    devices=[f"anon-{self.uid()}" for _ in range(self.rng.choice([1, 1, 2, 2, 3]))],
                    prefs=prefs,
                    carries_prefs=eu or self.rng.random() < 0.5,
                )
                household.append(person)
                index += 1
            registered = [p for p in household if p.user_id]
            if len(registered) >= 2 and self.rng.random() < 0.4:
                tablet = f"anon-{self.uid()}"
                for p in registered:
                    p.tablet = tablet
            persons.extend(household)
        return persons

    # -- journeys ----------------------------------------------------------------------------

    def times(self, count: int) -> list[datetime]:
        span = (self.end - self.start).total_seconds()
        return sorted(
            self.start + timedelta(seconds=self.rng.random() * span, microseconds=0)
            for _ in range(count)
        )

    def journey(self, person: Person, budget: int) -> list[tuple[datetime, dict[str, Any], str]]:
        """(time, event, kind) for one person, in time order."""
        stamps = self.times(budget)
        out: list[tuple[datetime, dict[str, Any], str]] = []
        prefs = dict(person.prefs)
        withdraw_at = (
            self.rng.randrange(budget) if budget > 4 and self.rng.random() < 0.05 else None
        )
        if withdraw_at is not None:
            person.carries_prefs = True  # once a person withdraws, their SDK always says so
        orders: list[tuple[str, float, str]] = []
        open_tickets: list[str] = []
        closed: list[str] = []
        identified = False
        anon_steps = self.rng.randint(1, 4)
        for step, ts in enumerate(stamps):
            event: dict[str, Any]
            if step == withdraw_at:
                granted = [p for p in ("analytics", "personalization", "marketing") if prefs[p]]
                if granted:
                    purpose = self.rng.choice(granted)
                    prefs[purpose] = False
                    event = {
                        "type": "consent",
                        "consent": {
                            "purpose": purpose,
                            "status": "withdrawn",
                            "source": self.rng.choice(CMPS),
                            "policyVersion": "2026-03",
                            "jurisdiction": "US" if person.country == "US" else "EU",
                        },
                    }
                    self.identify_as(
                        event, person, person.devices[0], logged_in=bool(person.user_id)
                    )
                    out.append((ts, event, "consent_change"))
                    continue
            if step < anon_steps and not identified:
                event = self.behavioral(person, prefs, person.devices[0], False)
                out.append((ts, event, self.kind_of(event)))
                continue
            if not identified:
                identified = True
                if person.user_id or self.rng.random() < 0.5:
                    out.append((ts, self.identify(person, person.devices[0]), "identify"))
                    continue
            kind = self.rng.choices(
                ["behavioral", "order", "refund", "ticket", "close", "csat", "identify", "alias"],
                weights=[
                    62,
                    12,
                    3 if orders else 0,
                    6,
                    5 if open_tickets else 0,
                    3 if closed else 0,
                    5,
                    2 if person.user_id else 0,
                ],
            )[0]
            logged_in = bool(person.user_id) and self.rng.random() < 0.8
            device = self.rng.choice(person.devices)
            if person.tablet and logged_in and self.rng.random() < 0.25:
                device = person.tablet
            if kind == "behavioral":
                event = self.behavioral(person, prefs, device, logged_in)
                out.append((ts, event, self.kind_of(event)))
            elif kind == "order":
                event, order = self.order(person, device, logged_in)
                orders.append(order)
                out.append((ts, event, "order_completed"))
            elif kind == "refund":
                out.append(
                    (
                        ts,
                        self.refund(person, device, logged_in, self.rng.choice(orders)),
                        "order_refunded",
                    )
                )
            elif kind == "ticket":
                ticket = f"T-{self.hex(8)}"
                open_tickets.append(ticket)
                out.append((ts, self.ticket(person, "Ticket Opened", ticket), "ticket_opened"))
            elif kind == "close":
                ticket = open_tickets.pop(0)
                closed.append(ticket)
                out.append((ts, self.ticket(person, "Ticket Closed", ticket), "ticket_closed"))
            elif kind == "csat":
                out.append(
                    (ts, self.ticket(person, "CSAT Submitted", closed.pop(0)), "csat_submitted")
                )
            elif kind == "identify":
                out.append(
                    (
                        ts,
                        self.identify(
                            person, device if device != person.tablet else person.devices[0]
                        ),
                        "identify",
                    )
                )
            else:
                new_device = f"anon-{self.uid()}"
                person.devices.append(new_device)
                event = {"type": "alias", "previousId": new_device, "userId": person.user_id}
                out.append((ts, event, "alias"))
        for ts, event, _ in out:
            event["messageId"] = self.uid()
            event["timestamp"] = (
                ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{self.rng.randrange(1000):03d}Z"
            )
        return out

    @staticmethod
    def kind_of(event: dict[str, Any]) -> str:
        return {"page": "page", "screen": "screen"}.get(event["type"], "track")

    def identify_as(
        self, event: dict[str, Any], person: Person, device: str, logged_in: bool
    ) -> None:
        if logged_in and person.user_id:
            event["userId"] = person.user_id
        if device != person.tablet or logged_in:
            event["anonymousId"] = device

    def context(self, person: Person, prefs: dict[str, bool] | None) -> dict[str, Any]:
        context: dict[str, Any] = {"location": {"country": person.country}}
        if prefs is not None:
            context["consent"] = {"categoryPreferences": dict(prefs)}
        return context

    def behavioral(
        self, person: Person, prefs: dict[str, bool], device: str, logged_in: bool
    ) -> dict[str, Any]:
        roll = self.rng.random()
        if roll < 0.55:
            path = self.rng.choice(PAGES)
            event: dict[str, Any] = {"type": "page", "name": path, "properties": {"path": path}}
        elif roll < 0.7:
            event = {"type": "screen", "name": self.rng.choice(["Home", "Product", "Cart"])}
        else:
            event = {
                "type": "track",
                "event": self.rng.choice(TRACK_EVENTS),
                "properties": {"category": self.rng.choice(CATEGORIES)},
            }
        self.identify_as(event, person, device, logged_in)
        # Shared-device and withdrawing persons always carry preferences: see the module doc.
        carry = person.carries_prefs or device == person.tablet
        event["context"] = self.context(person, prefs if carry else None)
        return event

    def identify(self, person: Person, device: str) -> dict[str, Any]:
        traits: dict[str, Any] = {"email": self.email_variant(person.email)}
        if self.rng.random() < 0.7:
            traits["phone"] = self.phone_variant(person.phone, with_region=True)
        first = self.typo(person.first_name) if self.rng.random() < 0.05 else person.first_name
        traits.update(
            {
                "first_name": first,
                "last_name": person.last_name,
                "birthday": person.birthday,
                "address": dict(person.address),
            }
        )
        event: dict[str, Any] = {
            "type": "identify",
            "anonymousId": device,
            "traits": traits,
            "context": self.context(person, None),
        }
        if person.user_id:
            event["userId"] = person.user_id
        return event

    def order(
        self, person: Person, device: str, logged_in: bool
    ) -> tuple[dict[str, Any], tuple[str, float, str]]:
        currency = COUNTRIES[person.country][0]
        products = [
            {
                "product_id": f"SKU-{self.rng.randint(1000, 9999)}",
                "category": self.rng.choice(CATEGORIES),
                "price": round(self.rng.uniform(5, 180), 2),
                "quantity": self.rng.randint(1, 3),
            }
            for _ in range(self.rng.randint(1, 3))
        ]
        total = round(sum(p["price"] * p["quantity"] for p in products), 2)
        order_id = f"ord_{self.hex(10)}"
        props: dict[str, Any] = {
            "order_id": order_id,
            "total": total,
            "currency": currency,
            "products": products,
        }
        event: dict[str, Any] = {
            "type": "track",
            "event": "Order Completed",
            "properties": props,
            "context": self.context(person, None),
        }
        if logged_in:
            event["userId"] = person.user_id
            event["anonymousId"] = device
        else:
            event["anonymousId"] = device if device != person.tablet else person.devices[0]
            email = self.typo(person.email) if self.rng.random() < 0.01 else person.email
            props["email"] = self.email_variant(email)
        return event, (order_id, total, currency)

    def refund(
        self, person: Person, device: str, logged_in: bool, order: tuple[str, float, str]
    ) -> dict[str, Any]:
        order_id, total, currency = order
        amount = total if self.rng.random() < 0.5 else round(total * self.rng.uniform(0.1, 0.9), 2)
        event: dict[str, Any] = {
            "type": "track",
            "event": "Order Refunded",
            "properties": {"order_id": order_id, "total": amount, "currency": currency},
        }
        if logged_in:
            event["userId"] = person.user_id
        else:
            event["anonymousId"] = device if device != person.tablet else person.devices[0]
            event["properties"]["email"] = self.email_variant(person.email)
        return event

    def ticket(self, person: Person, name: str, ticket_id: str) -> dict[str, Any]:
        props: dict[str, Any] = {"ticket_id": ticket_id}
        event: dict[str, Any] = {"type": "track", "event": name, "properties": props}
        channel = self.rng.choice(
            ["email", "phone", "chat"] if person.user_id else ["email", "phone"]
        )
        if name == "Ticket Opened":
            props["channel"] = channel
            props["subject"] = self.rng.choice(
                ["Where is my order?", "Refund request", "Login problem"]
            )
        if channel == "chat":
            event["userId"] = person.user_id
        elif channel == "phone":
            with_region = self.rng.random() < 0.5
            props["phone"] = self.phone_variant(person.phone, with_region)
            if with_region:
                event["context"] = {"location": {"country": person.country}}
        else:
            email = self.typo(person.email) if self.rng.random() < 0.01 else person.email
            props["email"] = self.email_variant(email)
        if name == "CSAT Submitted":
            props["score"] = self.rng.randint(1, 5)
        return event

    # -- outcomes ----------------------------------------------------------------------------

    def outcome(self, kind: str, event: dict[str, Any]) -> tuple[str, str]:
        purpose = self.policy.purpose_for(kind)
        if purpose is None:
            return "applied", ""
        prefs = (event.get("context") or {}).get("consent", {}).get("categoryPreferences", {})
        if purpose in prefs:
            granted = prefs[purpose]
        else:
            country = (event.get("context") or {}).get("location", {}).get("country")
            jurisdiction = self.policy.jurisdiction_of(country)
            granted = self.policy.default_status(jurisdiction, purpose) == "granted"
        return ("applied", "") if granted else ("withheld", purpose)

    @staticmethod
    def quality_outcome(event: dict[str, Any]) -> tuple[str, str] | None:
        """A realistic line the quality suites reject (a typo'd email domain), or None.

        Mirrors the envelope suite's contact checks: a placeholder email, an email that is
        not one (a typo can drop a domain's letter: "web.d"), an unparseable phone.
        """
        sources = (
            event.get("traits") or {},
            (event.get("context") or {}).get("traits") or {},
            event.get("properties") or {},
        )
        email = next((s["email"] for s in sources if isinstance(s.get("email"), str)), None)
        if email is not None:
            cleaned = email.strip().lower()
            if cleaned in PLACEHOLDER_EMAILS:
                return "rejected", "placeholder_email"
            if not re.match(EMAIL_PATTERN, cleaned):
                return "rejected", "invalid_email"
        phone = next((s["phone"] for s in sources if isinstance(s.get("phone"), str)), None)
        if phone is not None and normalise_phone(phone, region_hint(event)) is None:
            return "rejected", "invalid_phone"
        return None

    def malformed(self, n: int) -> tuple[bytes, str]:
        """One garbage line with exactly one defect, and the reason code it must get."""
        mid = self.uid()
        base = {
            "type": "page",
            "messageId": mid,
            "timestamp": "2026-10-15T10:00:00.000Z",
            "anonymousId": f"anon-{self.uid()}",
        }
        order = {
            "type": "track",
            "event": "Order Completed",
            "messageId": mid,
            "timestamp": "2026-10-15T10:00:00.000Z",
            "userId": f"u_{self.hex(12)}",
            "properties": {"order_id": f"ord_{self.hex(10)}", "total": 19.99, "currency": "EUR"},
        }
        defect = n % 20
        if defect == 0:
            return orjson.dumps({**base, "properties": {"blob": "x" * 33_000}}), "payload_too_large"
        if defect == 1:
            return orjson.dumps(base).replace(
                b'"page"', b'"page", "name": "caf\xe9"', 1
            ), "invalid_utf8"
        if defect == 2:
            raw = orjson.dumps(base)
            return raw[: raw.index(b"anonymousId")], "malformed_json"
        if defect == 3:
            return orjson.dumps([base]), "not_an_object"
        if defect == 4:
            nested: Any = mid
            for _ in range(40):
                nested = {"n": nested}
            return orjson.dumps({**base, "properties": nested}), "too_deeply_nested"
        if defect == 5:
            return orjson.dumps({**base, "type": "telemetry"}), "unknown_event_type"
        if defect == 6:
            return orjson.dumps({**base, "schemaVersion": 2}), "unknown_schema_version"
        if defect == 7:
            return orjson.dumps(
                {**order, "properties": {"total": 5.0, "currency": "EUR", "note": mid}}
            ), "missing_required_field"
        if defect == 8:
            return orjson.dumps(
                {**order, "properties": {**order["properties"], "total": "19.99"}}
            ), "wrong_type"
        if defect == 9:
            return orjson.dumps(
                {**order, "properties": {**order["properties"], "total": -5}}
            ), "invalid_value"
        if defect == 10:
            return orjson.dumps(
                {**order, "properties": {**order["properties"], "currency": "euro"}}
            ), "invalid_value"
        if defect == 11:
            return orjson.dumps({**base, "timestamp": "yesterday"}), "invalid_value"
        if defect == 12:
            return orjson.dumps({**base, "timestamp": "2026-13-45T10:00:00Z"}), "invalid_timestamp"
        if defect == 13:
            no_ids = {k: v for k, v in base.items() if k != "anonymousId"}
            return orjson.dumps(
                {**no_ids, "context": {"traits": {"email": "n/a"}}}
            ), "missing_identifier"
        # Well-formed lines the quality suites (quality/suites.py) must reject.
        if defect == 14:
            return orjson.dumps(
                {**order, "properties": {**order["properties"], "currency": "ZZZ"}}
            ), "unknown_currency"
        if defect == 15:
            return orjson.dumps(
                {**base, "timestamp": "1970-01-01T00:00:00.000Z"}
            ), "timestamp_too_old"
        if defect == 16:
            future = f"{self.end.year + 100}-01-01T00:00:00.000Z"
            return orjson.dumps({**base, "timestamp": future}), "timestamp_in_future"
        if defect == 17:
            return orjson.dumps(
                {**order, "properties": {**order["properties"], "email": "N/A"}}
            ), "placeholder_email"
        if defect == 18:
            ticket = {
                **order,
                "event": "Ticket Opened",
                "properties": {"ticket_id": f"T-{self.hex(8)}", "phone": "12345"},
            }
            return orjson.dumps(ticket), "invalid_phone"
        identify = {**base, "type": "identify", "userId": f"u_{self.hex(12)}"}
        return orjson.dumps({**identify, "traits": {"email": "bob@localhost"}}), "invalid_email"

    # -- the stream --------------------------------------------------------------------------

    def lines(
        self, malformed_rate: float, duplicate_rate: float
    ) -> Iterator[tuple[bytes, TruthRow]]:
        if self.n_events < 2 * self.n_persons:
            raise ValueError(
                f"{self.n_events} events are too few for {self.n_persons} persons (need 2 each)"
            )
        persons = self.make_persons()
        n_bad = int(self.n_events * malformed_rate)
        n_dup = int(self.n_events * duplicate_rate)
        n_valid = self.n_events - n_bad - n_dup
        weights = [min(self.rng.paretovariate(1.3), 40.0) for _ in persons]
        scale = (n_valid - len(persons)) / sum(weights)
        budgets = [1 + int(w * scale) for w in weights]
        for i in range(n_valid - sum(budgets)):
            budgets[i % len(budgets)] += 1
        timeline: list[tuple[datetime, int, bytes, str, str, str, str]] = []
        for person, budget in zip(persons, budgets, strict=True):
            for ts, event, kind in self.journey(person, budget):
                outcome, reason = self.quality_outcome(event) or self.outcome(kind, event)
                timeline.append(
                    (
                        ts,
                        len(timeline),
                        orjson.dumps(event),
                        event["messageId"],
                        person.key,
                        kind,
                        f"{outcome}:{reason}",
                    )
                )
        timeline.sort()
        # Each line gets a position; re-sent lines land after their original, garbage anywhere.
        placed: list[tuple[float, bytes, str, str, str, str]] = [
            (float(i), raw, mid, person, kind, status)
            for i, (_, _, raw, mid, person, kind, status) in enumerate(timeline)
        ]
        total = len(placed)
        for _ in range(n_dup):
            source = self.rng.randrange(total)
            _, raw, mid, person, kind, _status = placed[source]
            placed.append(
                (self.rng.uniform(source + 0.5, total), raw, mid, person, kind, "duplicate:")
            )
        for n in range(n_bad):
            raw, reason = self.malformed(n)
            placed.append(
                (self.rng.uniform(-0.5, total), raw, "", "", "malformed", f"rejected:{reason}")
            )
        placed.sort(key=lambda row: row[0])
        for line, (_, raw, mid, person, kind, status) in enumerate(placed, start=1):
            outcome, reason = status.split(":", 1)
            yield raw, TruthRow(line, mid, person, kind, route(raw)[0], outcome, reason)


def generate(
    persons: int,
    events: int,
    seed: int,
    end: datetime,
    malformed_rate: float = 0.02,
    duplicate_rate: float = 0.005,
) -> Iterator[tuple[bytes, TruthRow]]:
    """Exactly `events` lines (bytes, no newline) with their truth; same arguments, same bytes."""
    return _Generator(persons, events, seed, end).lines(malformed_rate, duplicate_rate)


def write_dataset(
    out: Path,
    truth: Path | None,
    persons: int,
    events: int,
    seed: int,
    end: datetime,
    progress: Callable[[int], None] | None = None,
) -> GenerationSummary:
    """Write the JSONL events (and the truth CSV when asked); returns what was written."""
    summary = GenerationSummary(persons=persons)
    out.parent.mkdir(parents=True, exist_ok=True)
    truth_handle = truth.open("w", newline="") if truth else None
    writer = csv.writer(truth_handle) if truth_handle else None
    if writer:
        writer.writerow(TRUTH_COLUMNS)
    try:
        with out.open("wb") as handle:
            for raw, row in generate(persons, events, seed, end):
                handle.write(raw + b"\n")
                summary.events += 1
                summary.by_kind[row.kind] += 1
                summary.by_outcome[row.expected_outcome] += 1
                if writer:
                    writer.writerow(
                        [
                            row.line,
                            row.message_id,
                            row.person,
                            row.kind,
                            row.topic,
                            row.expected_outcome,
                            row.expected_reason,
                        ]
                    )
                if progress and summary.events % 10_000 == 0:
                    progress(summary.events)
    finally:
        if truth_handle:
            truth_handle.close()
    if progress:
        progress(summary.events)
    return summary
