"""Builders of consent-related events at minutes after a fixed start, for consent tests."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

START = datetime(2026, 10, 1, 8, tzinfo=UTC)


class ConsentEvents:
    """Segment-spec events of one subject (`u1` unless told), timed in minutes after START."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)

    @staticmethod
    def at(minute: int) -> str:
        return (START + timedelta(minutes=minute)).isoformat().replace("+00:00", "Z")

    def consent(
        self, purpose: str, status: str, minute: int, user: str = "u1", **extra: Any
    ) -> dict[str, Any]:
        """A consent event from `cmp-one`; extra keys (policyVersion, jurisdiction) join it."""
        return {
            "type": "consent",
            "messageId": f"c-{next(self._ids)}",
            "timestamp": self.at(minute),
            "userId": user,
            "consent": {"purpose": purpose, "status": status, "source": "cmp-one", **extra},
        }

    def identify(
        self, minute: int, traits: dict[str, Any], country: str = "DE", user: str = "u1"
    ) -> dict[str, Any]:
        return {
            "type": "identify",
            "messageId": f"i-{next(self._ids)}",
            "timestamp": self.at(minute),
            "userId": user,
            "traits": traits,
            "context": {"location": {"country": country}},
        }

    def page(
        self, minute: int, traits: dict[str, Any] | None = None, country: str = "DE"
    ) -> dict[str, Any]:
        """A page view (collected for analytics) stating `traits` in its context."""
        return {
            "type": "page",
            "messageId": f"p-{next(self._ids)}",
            "timestamp": self.at(minute),
            "userId": "u1",
            "name": "home",
            "context": {"location": {"country": country}, "traits": traits or {}},
        }


@pytest.fixture(scope="session")
def events() -> ConsentEvents:
    return ConsentEvents()
