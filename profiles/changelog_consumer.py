"""A change-feed consumer: follow `tessera.profiles.changelog`, keep the latest profile per person.

    python -m profiles.changelog_consumer --bootstrap 127.0.0.1:9092 --purpose personalization

prints one JSON line per change: {"person_id", "change": "upsert" | "tombstone",
"version", "profile"}, where `profile` is the purpose's view with windowed traits
evaluated now (null when the person has no view for that purpose, or is gone).

The topic, as this consumer reads it:
- **Key**: the person id (UTF-8). **Value**: the full profile document after the change
  (JSON): `person_id`, `version` (increments per change), `identifiers` by type,
  `merged_from`, and `views`, one per purpose (plus `subject_access`), each holding the
  view's `identifiers`, identify `traits` (value, ts, event_key), `computed` traits, and
  `windows` (daily buckets, event-time UTC days, that windowed traits are summed from
  at read time: see profiles/traits.py `at_read`).
- **Tombstone** (null value): the person is gone: merged into another person (whose
  document lists the old id in `merged_from`) or erased. Drop what you hold for them.
- **Compacted**: a consumer starting from the beginning sees at least the latest document
  per person; a document's `version` tells newer from older.
- **Consent**: a view exists only while the person consents to its purpose; a withdrawal
  publishes a document without that view. Read only the view of your purpose.

It reads every partition from the beginning without a consumer group; a long-running
service would use a group and commit offsets after it has stored each change.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from pipelines import topics
from profiles.traits import TraitCatalog, at_read, load_traits

TOPIC = topics.PROFILES_CHANGELOG


class ChangelogView:
    """The latest document per person, as the changelog says, and one purpose's view of it."""

    def __init__(self, purpose: str, traits: TraitCatalog | None = None) -> None:
        self.purpose = purpose
        self.traits = traits or load_traits()
        self.documents: dict[str, dict[str, Any]] = {}

    def apply(self, key: bytes, value: bytes | None, now: datetime | None = None) -> dict[str, Any]:
        """Take one changelog record; return the change as printed."""
        person = key.decode()
        if value is None:
            self.documents.pop(person, None)
            return {"person_id": person, "change": "tombstone", "version": None, "profile": None}
        doc = orjson.loads(value)
        held = self.documents.get(person)
        if held is None or doc.get("version", 0) >= held.get("version", 0):
            self.documents[person] = doc
        return {
            "person_id": person,
            "change": "upsert",
            "version": doc.get("version"),
            "profile": self.view(person, now),
        }

    def view(self, person: str, now: datetime | None = None) -> dict[str, Any] | None:
        """The purpose's view of a person's latest document, windows evaluated at `now`."""
        doc = self.documents.get(person)
        view = (doc or {}).get("views", {}).get(self.purpose)
        if view is None:
            return None
        computed = at_read(
            self.traits, view["computed"], view.get("windows") or {}, now or datetime.now(UTC)
        )
        return {"identifiers": view["identifiers"], "traits": view["traits"], "computed": computed}


def follow(
    bootstrap: str,
    on_record: Callable[[bytes, bytes | None], None],
    until_end: bool = False,
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """Read the changelog from the beginning, calling `on_record(key, value)` in order.

    Returns when `stop()` says so, or with `until_end` once every partition is read to its end.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "changelog-example",  # required by the client; nothing is committed
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        partitions = consumer.list_topics(TOPIC, timeout=10).topics[TOPIC].partitions
        consumer.assign([TopicPartition(TOPIC, p, OFFSET_BEGINNING) for p in partitions])
        at_end: set[int] = set()
        while not stop() and not (until_end and at_end >= set(partitions)):
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error():
                if message.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(message.partition())
                    continue
                raise RuntimeError(str(message.error()))
            at_end.discard(message.partition())
            on_record(message.key() or b"", message.value())
    finally:
        consumer.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True, help="Kafka bootstrap HOST:PORT")
    parser.add_argument("--purpose", required=True, help="the purpose whose view to print")
    parser.add_argument("--until-end", action="store_true", help="exit at the end of the topic")
    args = parser.parse_args(argv)
    view = ChangelogView(args.purpose)

    def printed(key: bytes, value: bytes | None) -> None:
        sys.stdout.write(orjson.dumps(view.apply(key, value)).decode() + "\n")
        sys.stdout.flush()

    follow(args.bootstrap, printed, until_end=args.until_end)


if __name__ == "__main__":
    main()
