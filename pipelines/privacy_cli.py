"""`tessera privacy ...`: erasure requests and their certificates, over Kafka."""

from __future__ import annotations

import time
from typing import Annotated

import orjson
import typer
from rich.console import Console

from pipelines import topics

privacy_app = typer.Typer(
    help="Privacy requests: erase a data subject and print the erasure certificate.",
    no_args_is_help=True,
)
console = Console(stderr=True)

Bootstrap = Annotated[
    str, typer.Option("--bootstrap", envvar="TESSERA_BOOTSTRAP", help="Kafka bootstrap HOST:PORT")
]


def find_certificate(bootstrap: str, request_id: str) -> dict | None:
    """The certificate of `request_id` on the certificates topic, or None while there is none."""
    from pipelines.kafka import read_topic

    for _, _, key, value, _ in read_topic(bootstrap, topics.ERASURES):
        if key == request_id.encode() and value:
            return orjson.loads(value)
    return None


def _wait_and_print(bootstrap: str, request_id: str, wait: float) -> None:
    deadline = time.monotonic() + wait
    while True:
        certificate = find_certificate(bootstrap, request_id)
        if certificate is not None:
            print(orjson.dumps(certificate, option=orjson.OPT_INDENT_2).decode())
            return
        if time.monotonic() >= deadline:
            console.print(f"no certificate for {request_id} yet; is a worker running?")
            raise typer.Exit(1)
        time.sleep(0.5)


@privacy_app.command("erase")
def erase(
    identifier: Annotated[
        str,
        typer.Option(
            help="the subject: TYPE:VALUE, TYPE one of user_id, anonymous_id, email, phone"
        ),
    ],
    bootstrap: Bootstrap,
    requested_by: Annotated[str, typer.Option(help="who asks (kept in the certificate)")] = "cli",
    wait: Annotated[
        float, typer.Option(help="seconds to wait for the certificate (0: don't)")
    ] = 60,
) -> None:
    """Send an erasure request (the identifier travels only as its hash); print the certificate."""
    from consent.erasure import erasure_request
    from identity.normalise import ID_TYPES, parse_identifier
    from pipelines.broker import BrokerError, ensure_reachable
    from pipelines.kafka import BatchProducer
    from pipelines.pipeline import OutRecord

    id_type, _, value = identifier.partition(":")
    if id_type not in ID_TYPES:
        console.print(f"[bold red]error:[/] identifier type must be one of {', '.join(ID_TYPES)}")
        raise typer.Exit(2)
    parsed = parse_identifier(id_type, value)
    if parsed is None:
        console.print(f"[bold red]error:[/] not a valid {id_type}")
        raise typer.Exit(2)
    try:
        ensure_reachable(bootstrap)
    except BrokerError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    request = erasure_request(parsed, requested_by)
    producer = BatchProducer(bootstrap)
    try:
        producer.send(
            [OutRecord(topics.PRIVACY, request["request_id"].encode(), orjson.dumps(request))]
        )
    finally:
        producer.close()
    console.print(f"erasure requested: {request['request_id']} (subject {request['subject']})")
    if wait > 0:
        _wait_and_print(bootstrap, request["request_id"], wait)


@privacy_app.command("certificate")
def certificate(
    request_id: Annotated[str, typer.Argument(help="the request id `erase` printed")],
    bootstrap: Bootstrap,
    wait: Annotated[float, typer.Option(help="seconds to wait for it")] = 0,
) -> None:
    """Print the certificate of an erasure request."""
    _wait_and_print(bootstrap, request_id, wait)
