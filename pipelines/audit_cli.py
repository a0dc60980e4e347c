"""`tessera audit`: verify the lineage ledger, a subject's timeline, an attribute's provenance,
exports. Reads a store file (an API replica or a worker's state, not in use by a running
process) or asks a running API (`--api`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.table import Table

audit_app = typer.Typer(
    help="Audit the lineage ledger: verify the chain, subject timelines, attribute provenance, exports.",
    no_args_is_help=True,
)
console = Console(stderr=True)
out = Console()

StoreOption = Annotated[
    Path,
    typer.Option(
        "--store",
        envvar="TESSERA_AUDIT_STORE",
        help="a store holding the ledger: an API replica (<data-dir>/profiles.duckdb) or a "
        "worker's state file; not while a running process holds it (use --api then)",
    ),
]
ApiOption = Annotated[
    str | None,
    typer.Option("--api", help="ask this running profile API instead of reading a store"),
]
ApiKeyOption = Annotated[
    str, typer.Option(envvar="TESSERA_API_KEY", help="an auditor or admin API key (with --api)")
]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
DEFAULT_STORE = Path(".tessera/api/profiles.duckdb")


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


@contextmanager
def _audit(store: Path) -> Iterator[Any]:
    """An Audit over a store file opened read-only (the profile directory if it is a replica)."""
    import duckdb

    from consent.audit import Audit
    from profiles.store import ProfileStore

    if not store.exists():
        _fail(f"{store} does not exist (give --store, or ask a running API with --api)")
    try:
        opened = ProfileStore(store, read_only=True)
    except duckdb.Error as exc:
        _fail(f"cannot open {store}: {exc}. If a worker or API holds it, use --api URL.")
    try:
        tables = {
            row[0]
            for row in opened.conn.execute(
                "SELECT table_name FROM information_schema.tables"
            ).fetchall()
        }
        if "lineage" not in tables:
            _fail(f"{store} holds no lineage ledger")
        yield Audit(opened.conn, opened if "profile_documents" in tables else None)
    finally:
        opened.close()


def _api_get(api: str, path: str, api_key: str, **params: Any) -> Any:
    """GET from a running API; a non-200 answer fails with its error."""
    import httpx

    try:
        response = httpx.get(
            f"{api.rstrip('/')}{path}", params=params, headers={"X-API-Key": api_key}, timeout=60
        )
    except httpx.HTTPError as exc:
        _fail(f"cannot reach the API at {api}: {exc}")
    if response.status_code != 200:
        _fail(f"{response.status_code}: {response.text}")
    return response


def _print_json(payload: Any) -> None:
    out.print_json(orjson.dumps(payload).decode())


@audit_app.command()
def verify(
    store: StoreOption = DEFAULT_STORE,
    api: ApiOption = None,
    api_key: ApiKeyOption = "",
    as_json: JsonOption = False,
) -> None:
    """Recompute the ledger's hash chain and name the first broken entry (exit 1 if broken)."""
    if api:
        report = _api_get(api, "/v1/audit/verify", api_key).json()
    else:
        with _audit(store) as audit:
            report = audit.verify().as_dict()
    if as_json:
        _print_json(report)
    elif report["ok"]:
        out.print(f"[green]ledger intact[/]: {report['entries']:,} entries, chain verified")
    else:
        out.print(
            f"[bold red]ledger broken[/] at seq {report['first_broken_seq']} "
            f"(event {report['event_key']}): {report['problem']}"
        )
    if not report["ok"]:
        raise typer.Exit(1)


def _detail(row: dict[str, Any]) -> str:
    d = row["detail"]
    if row["category"] == "consent":
        parts = [f"source {d['source']}"]
        parts += [f"policy {d['policy_version']}"] if d.get("policy_version") else []
        parts += [f"jurisdiction {d['jurisdiction']}"] if d.get("jurisdiction") else []
        if d["arrived_out_of_order"]:
            parts.append("[yellow]arrived out of order[/]")
        parts.append("in force" if d["in_force"] else f"superseded by {d['superseded_by']}")
        return ", ".join(parts)
    if row["category"] == "identity":
        other = f" / {d['other_person_id']}" if d.get("other_person_id") else ""
        rule = f" (rule {d['rule']})" if d.get("rule") else ""
        return f"{d.get('person_id')}{other}{rule}"
    parts = [f"basis {d.get('basis')}"]
    parts += [f"consent {d['consent_ref']}"] if d.get("consent_ref") else []
    parts += [f"policy {d['policy_version']}"] if d.get("policy_version") else []
    parts += [f"masked {', '.join(d['fields_masked'])}"] if d.get("fields_masked") else []
    parts += [f"attributes {', '.join(d['attributes'])}"] if d.get("attributes") else []
    if d.get("moved_by"):
        parts.append(
            f"[yellow]person {d['person_id']} (ingested as {d['ingested_as']}, "
            f"moved by a {d['moved_by']})[/]"
        )
    return ", ".join(parts)


def _short_time(at: str | None) -> str:
    """An ISO time without its UTC offset and fraction, for tables (JSON keeps it whole)."""
    return (at or "").replace("T", " ").split("+")[0].split(".")[0]


_OUTCOME_STYLE = {"withheld": "red", "withdrawn": "red", "denied": "red", "granted": "green"}


def _render_timeline(body: dict[str, Any]) -> None:
    subject = body["subject"]
    out.print(
        f"[bold]{subject['identifier_hash']}[/] -> person {subject['person_id'] or '(none)'}"
        f"  ({', '.join(f'{k} {v}' for k, v in body['counts'].items())})"
    )
    if body["current_consent"]:
        consent = Table(
            "purpose", "status", "since", "source", "policy", "statement", title="consent in force"
        )
        for purpose, c in sorted(body["current_consent"].items()):
            consent.add_row(
                purpose,
                c["status"],
                c["since"] or "",
                c["source"] or "",
                c["policy_version"] or "",
                c["event_key"],
            )
        out.print(consent)
    table = Table(title="timeline")
    table.add_column("time (UTC)", no_wrap=True)
    for column in ("seq", "what", "purpose", "outcome"):
        table.add_column(column)
    table.add_column("detail", ratio=1)
    for row in body["timeline"]:
        style = _OUTCOME_STYLE.get(row["outcome"], "")
        outcome = f"[{style}]{row['outcome']}[/]" if style else row["outcome"]
        if row["category"] == "identity":
            outcome = ""  # the kind, already under "what"
        table.add_row(
            _short_time(row["at"]),
            str(row["seq"]) if row["seq"] is not None else "",
            row["category"] if row["category"] == "consent" else f"{row['category']} {row['kind']}",
            row["purpose"] or "",
            outcome,
            _detail(row),
        )
    out.print(table)


@audit_app.command()
def subject(
    identifier: Annotated[
        str, typer.Option("--identifier", help="TYPE:VALUE, e.g. email:ada@example.org")
    ],
    store: StoreOption = DEFAULT_STORE,
    api: ApiOption = None,
    api_key: ApiKeyOption = "",
    as_json: JsonOption = False,
) -> None:
    """A subject's timeline: consent statements, ingestion decisions, identity events, erasures."""
    from consent.audit import parse_subject

    try:
        parsed = parse_subject(identifier)
    except ValueError as exc:
        _fail(str(exc))
    if api:
        body = _api_get(api, f"/v1/audit/subjects/{identifier}", api_key).json()
    else:
        with _audit(store) as audit:
            body = audit.subject(parsed)
        if body is None:
            _fail("the ledger holds nothing on this subject", 1)
    if as_json:
        _print_json(body)
    else:
        _render_timeline(body)


@audit_app.command()
def attribute(
    person_id: Annotated[str, typer.Argument(help="the person")],
    name: Annotated[str, typer.Argument(help="the attribute (a trait or a computed trait)")],
    store: StoreOption = DEFAULT_STORE,
    api: ApiOption = None,
    api_key: ApiKeyOption = "",
    as_json: JsonOption = False,
) -> None:
    """The provenance of one attribute: the events that produced it, and the consent and policy
    version each was admitted under, per purpose."""
    from consent.audit import AuditUnavailable

    if api:
        body = _api_get(api, f"/v1/audit/profiles/{person_id}/attributes/{name}", api_key).json()
    else:
        with _audit(store) as audit:
            try:
                body = audit.attribute(person_id, name)
            except AuditUnavailable as exc:
                _fail(f"{exc}; {store} is not one")
        if body is None:
            _fail(f"no attribute {name!r} of person {person_id!r}", 1)
    if as_json:
        _print_json(body)
        return
    out.print(f"[bold]{body['person_id']}[/] . {body['attribute']}")
    views = Table(
        "purpose", "held", "from event", "admitted", "consent in force", title="per purpose"
    )
    for view in body["views"]:
        admitted = view["admitted"]
        force = view["consent_in_force"]
        views.add_row(
            view["purpose"],
            "yes" if view["present"] else "[red]no[/]",
            view["source_event"] or "",
            f"{admitted['basis']} (policy {admitted['policy_version']})" if admitted else "",
            f"{force['status']} since {_short_time(force['since'])} ({force['source']})"
            if force
            else "none stated (jurisdiction default)",
        )
    out.print(views)
    events = Table(
        "seq",
        "time",
        "event",
        "kind",
        "decision",
        "purpose",
        "consent",
        "policy",
        title="producing events",
    )
    for event in body["events"]:
        consent = event["consent"] or {}
        events.add_row(
            str(event["seq"]),
            event["at"] or "",
            event["event_key"],
            event["kind"] or "",
            event["decision"],
            event["purpose"] or "",
            f"{consent.get('status', '')} {consent.get('event_key', consent.get('basis', ''))}",
            event["policy_version"] or "",
        )
    out.print(events)


@audit_app.command()
def export(
    out_path: Annotated[Path, typer.Option("--out", help="FILE.parquet or FILE.csv")],
    identifier: Annotated[
        str | None, typer.Option("--identifier", help="TYPE:VALUE: only this subject's entries")
    ] = None,
    store: StoreOption = DEFAULT_STORE,
    api: ApiOption = None,
    api_key: ApiKeyOption = "",
) -> None:
    """Export the ledger (or one subject's entries), hashes included, as Parquet or CSV."""
    from consent.audit import EXPORT_FORMATS, parse_subject

    fmt = out_path.suffix.lstrip(".").lower()
    if fmt not in EXPORT_FORMATS:
        _fail(f"--out must end in .parquet or .csv, not {out_path.name!r}")
    try:
        parsed = parse_subject(identifier) if identifier else None
    except ValueError as exc:
        _fail(str(exc))
    if api:
        params = {"format": fmt, **({"identifier": identifier} if identifier else {})}
        out_path.write_bytes(_api_get(api, "/v1/audit/export", api_key, **params).content)
        console.print(f"wrote {out_path}")
        return
    with _audit(store) as audit:
        rows = audit.export(out_path, fmt, parsed)
    console.print(f"wrote {rows:,} ledger entries to {out_path}")
