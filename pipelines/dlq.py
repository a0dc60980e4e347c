"""`tessera dlq`: inspect dead letters and re-drive them, fixed or not, to their source topic.

A dead letter is one record of `tessera.events.rejected`: the original bytes as value,
and headers with the reason codes, the source topic/partition/offset, the schema and
the time. Its id here is its offset on the dead-letter topic (one partition).

Replay is idempotent because the pipeline is: event keys (the messageId, or a hash of
the bytes) make a re-driven event that already has an outcome a duplicate. So re-driving
unchanged bytes changes nothing, and re-driving the same fix twice yields one outcome.
A fixed payload (`--fixed FILE`) is a new event: it gets its own outcome, even when it
keeps the rejected event's messageId.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.table import Table

from consent.keys import configured_key_store, is_sealed
from pipelines import topics

dlq_app = typer.Typer(
    name="dlq",
    help="Inspect and replay dead letters (tessera.events.rejected).",
    no_args_is_help=True,
)
console = Console()

Bootstrap = Annotated[
    str, typer.Option("--bootstrap", envvar="TESSERA_BOOTSTRAP", help="Kafka bootstrap HOST:PORT")
]


_key_store = cache(configured_key_store)  # opened once per process


@dataclass(frozen=True)
class DeadLetter:
    """One rejected event as the dead-letter topic holds it."""

    offset: int
    key: str
    value: bytes
    headers: dict[str, str]

    @property
    def reasons(self) -> list[dict[str, str]]:
        """Every reason (code and detail); the first is the primary one."""
        try:
            reasons = orjson.loads(self.headers.get("tessera.reasons", "[]"))
        except orjson.JSONDecodeError:
            reasons = []
        return reasons or [{"code": self.headers.get("tessera.reason", "unknown"), "detail": ""}]

    @property
    def codes(self) -> list[str]:
        return [r.get("code", "") for r in self.reasons]

    @property
    def source_topic(self) -> str:
        return self.headers.get("tessera.source.topic", "")

    def preview(self, width: int = 60) -> str:
        """The payload as readable text: decoded when it is UTF-8, escaped bytes otherwise.

        A payload sealed for its subjects is opened with $TESSERA_KEY_STORE when it is set
        and the subjects' key still exists; otherwise it shows sealed.
        """
        value = self.value
        if is_sealed(value) and (keys := _key_store()) is not None:
            value = keys.open(value) or value
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            text = repr(value)[2:-1]
        text = text.replace("\n", "\\n")
        return text if len(text) <= width else text[: width - 1] + "…"

    def as_dict(self, payload_chars: int = 2000) -> dict[str, Any]:
        return {
            "offset": self.offset,
            "event_key": self.key,
            "reasons": self.reasons,
            "source": {
                "topic": self.source_topic,
                "partition": self.headers.get("tessera.source.partition"),
                "offset": self.headers.get("tessera.source.offset"),
            },
            "schema": self.headers.get("tessera.schema"),
            "rejected_at": self.headers.get("tessera.rejected_at"),
            "bytes": len(self.value),
            "payload_preview": self.preview(payload_chars),
        }


def read_dead_letters(
    bootstrap: str,
    reason: str | None = None,
    source_topic: str | None = None,
    offsets: set[int] | None = None,
    limit: int | None = None,
) -> list[DeadLetter]:
    """Dead letters from offset zero to the end, filtered by reason code, source or offset.

    The end is the fetch high-water mark (partition EOF), which Tansu reports correctly.
    """
    from pipelines.kafka import read_topic

    found: list[DeadLetter] = []
    for _, offset, key, value, raw_headers in read_topic(bootstrap, topics.REJECTED):
        headers = {k: (v or b"").decode("utf-8", "replace") for k, v in raw_headers}
        letter = DeadLetter(offset, (key or b"").decode("utf-8", "replace"), value or b"", headers)
        if offsets is not None and letter.offset not in offsets:
            continue
        if reason and reason not in letter.codes:
            continue
        if source_topic and letter.source_topic != source_topic:
            continue
        found.append(letter)
        if limit is not None and len(found) >= limit:
            break
    return found


def replay(bootstrap: str, letters: list[DeadLetter], fixed: bytes | None = None) -> dict[str, int]:
    """Re-drive dead letters to their source topics; `fixed` replaces the payload of each.

    Out: how many were sent per topic. Events keep the partition key routing gives them.
    """
    from pipelines.kafka import BatchProducer
    from pipelines.pipeline import OutRecord
    from pipelines.topics import INPUT_TOPICS, route

    records = []
    for letter in letters:
        payload = fixed if fixed is not None else letter.value
        routed_topic, key = route(payload)
        # The source the event came from, unless a fix makes it another kind of event.
        topic = letter.source_topic if letter.source_topic in INPUT_TOPICS else routed_topic
        if fixed is not None:
            topic = routed_topic
        headers = (("tessera.replay_of", str(letter.offset).encode()),)
        records.append(OutRecord(topic, key, payload, headers))
    producer = BatchProducer(bootstrap)
    try:
        producer.send(records)
    finally:
        producer.close()
    sent: dict[str, int] = {}
    for record in records:
        sent[record.topic] = sent.get(record.topic, 0) + 1
    return sent


def _reachable(bootstrap: str) -> None:
    """Exit with the broker error and its fix when nothing answers at `bootstrap`."""
    from pipelines.broker import BrokerError, ensure_reachable

    try:
        ensure_reachable(bootstrap)
    except BrokerError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        raise typer.Exit(2) from None


@dlq_app.command("list")
def list_command(
    bootstrap: Bootstrap,
    reason: Annotated[str | None, typer.Option(help="only this reason code")] = None,
    topic: Annotated[str | None, typer.Option("--topic", help="only this source topic")] = None,
    limit: Annotated[int, typer.Option(min=1, help="at most this many")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """List dead letters, oldest first: offset, time, source, reasons, payload preview."""
    _reachable(bootstrap)
    letters = read_dead_letters(bootstrap, reason=reason, source_topic=topic, limit=limit)
    if as_json:
        for letter in letters:
            print(orjson.dumps(letter.as_dict(200)).decode())
        return
    table = Table("offset", "rejected at", "source", "reasons", "payload")
    for letter in letters:
        h = letter.headers
        table.add_row(
            str(letter.offset),
            h.get("tessera.rejected_at", ""),
            f"{letter.source_topic}/{h.get('tessera.source.partition', '?')}@{h.get('tessera.source.offset', '?')}",
            ", ".join(letter.codes),
            letter.preview(),
        )
    console.print(table)
    console.print(f"{len(letters)} dead letter(s)")


@dlq_app.command("show")
def show_command(
    offset: Annotated[int, typer.Argument(help="the dead letter's offset (from `dlq list`)")],
    bootstrap: Bootstrap,
) -> None:
    """Show one dead letter: every reason with its detail, its source, and the payload."""
    _reachable(bootstrap)
    letters = read_dead_letters(bootstrap, offsets={offset}, limit=1)
    if not letters:
        console.print(f"[bold red]error:[/] no dead letter at offset {offset}")
        raise typer.Exit(2)
    console.print_json(data=letters[0].as_dict())


@dlq_app.command("replay")
def replay_command(
    bootstrap: Bootstrap,
    offset: Annotated[
        list[int] | None, typer.Option("--offset", help="dead letter(s) to replay (repeatable)")
    ] = None,
    reason: Annotated[str | None, typer.Option(help="every dead letter with this reason")] = None,
    topic: Annotated[str | None, typer.Option("--topic", help="only this source topic")] = None,
    fixed: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="send this file's bytes instead (one --offset)"
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="list what would be replayed")] = False,
) -> None:
    """Re-drive dead letters to their source topic, unchanged or with a fixed payload."""
    if not offset and not reason and not topic:
        console.print("[bold red]error:[/] name dead letters with --offset, --reason or --topic")
        raise typer.Exit(2)
    if fixed is not None and len(offset or []) != 1:
        console.print(
            "[bold red]error:[/] --fixed replaces exactly one dead letter: give one --offset"
        )
        raise typer.Exit(2)
    _reachable(bootstrap)
    letters = read_dead_letters(
        bootstrap,
        reason=reason,
        source_topic=topic,
        offsets=set(offset) if offset else None,
    )
    missing = set(offset or []) - {letter.offset for letter in letters}
    if missing:
        console.print(f"[bold red]error:[/] no dead letter at offset(s) {sorted(missing)}")
        raise typer.Exit(2)
    payload = fixed.read_bytes().rstrip(b"\r\n") if fixed is not None else None
    if dry_run:
        for letter in letters:
            console.print(f"{letter.offset}  {', '.join(letter.codes)}  -> {letter.source_topic}")
        console.print(f"{len(letters)} dead letter(s) would be replayed")
        return
    sent = replay(bootstrap, letters, payload)
    for name, count in sorted(sent.items()):
        console.print(f"{count:>7,}  {name}")
    if payload is None:
        console.print(
            "unchanged bytes: events that already have an outcome stay as they are "
            "(the pipeline sees a duplicate)"
        )
