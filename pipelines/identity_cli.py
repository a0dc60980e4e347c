"""`tessera identity`: train the model, replay files through the resolver, explain, unmerge."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.console import Console
from rich.table import Table

identity_app = typer.Typer(
    help="Identity resolution: train, replay, explain, reject links.", no_args_is_help=True
)
console = Console(stderr=True)
out = Console()

IdColumn = Annotated[
    str, typer.Option("--id-column", help="the column that identifies each input row")
]
Maps = Annotated[
    list[str] | None,
    typer.Option("--map", help="SRC=FIELD: read column SRC as record field FIELD (repeatable)"),
]

AsJson = Annotated[bool, typer.Option("--json", help="print the summary as JSON on stdout")]


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def _records(path: Path, id_column: str, maps: list[str] | None) -> list[tuple[str, dict]]:
    from identity.sources import parse_mapping, read_records

    if not path.exists():
        _fail(f"{path} does not exist")
    try:
        return list(read_records(path, id_column, parse_mapping(maps or [])))
    except (ValueError, KeyError) as exc:
        _fail(str(exc))
    raise AssertionError("unreachable")


@identity_app.command()
def train(
    input: Annotated[Path, typer.Argument(help="CSV, Parquet, or JSONL events")],
    model_out: Annotated[Path, typer.Option("--out", help="where to write the model JSON")] = Path(
        "model.json"
    ),
    id_column: IdColumn = "record_id",
    map: Maps = None,
    max_pairs: Annotated[float, typer.Option(help="pairs sampled to estimate u")] = 2e6,
    seed: int = 7,
    as_json: AsJson = False,
) -> None:
    """Train a Splink model without labels (u by sampling, m by EM) and print its weights."""
    from identity.model import records_table, save_model, train_model
    from pipelines.cli_output import print_json, progress

    rows = _records(input, id_column, map)
    if len(rows) < 10:
        _fail(f"{input} has {len(rows)} records; training needs at least 10")
    started = time.perf_counter()
    with progress(console) as bar:
        bar.add_task(f"training on the distinct records of {len(rows):,} rows", total=None)
        table = records_table({"record_id": i, **fields} for i, fields in _unique(rows))
        try:
            model, report = train_model(table, max_pairs=max_pairs, seed=seed)
        except ValueError as exc:
            _fail(str(exc))
    save_model(model, model_out)
    if as_json:
        print_json(
            {"model": str(model_out), "seconds": time.perf_counter() - started, **report.__dict__}
        )
        return
    summary = Table(title=f"match weights ({', '.join(report.columns)})")
    for name in ("comparison", "level", "m", "u", "match weight"):
        summary.add_column(name, justify="right" if name in ("m", "u", "match weight") else "left")
    for level in report.levels:
        weight = level["match_weight"]
        summary.add_row(
            level["comparison"],
            level["level"],
            f"{level['m']:.4g}" if level["m"] else "-",
            f"{level['u']:.4g}" if level["u"] else "-",
            f"{weight:+.2f}" if weight is not None else "untrained",
        )
    out.print(summary)
    console.print(
        f"trained on {report.records:,} records in {time.perf_counter() - started:.1f} s; "
        f"prior {report.probability_two_random_records_match:.3g}; model written to {model_out}"
    )


def _unique(rows: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """One row per distinct record content, as the resolver stores them (a device's many
    page views are one record, and would otherwise weigh on u and m as many)."""
    from identity.records import record_id_of

    seen: set[str] = set()
    unique = []
    for input_id, fields in rows:
        content = record_id_of(fields)
        if content not in seen:
            seen.add(content)
            unique.append((input_id, fields))
    return unique


@identity_app.command()
def replay(
    input: Annotated[Path, typer.Argument(help="CSV, Parquet, or JSONL events")],
    model: Annotated[Path, typer.Option("--model", help="model JSON from `identity train`")],
    clusters_out: Annotated[Path, typer.Option("--out", help="CSV of record_id,person_id")],
    id_column: IdColumn = "record_id",
    map: Maps = None,
    batch_size: Annotated[int, typer.Option(min=1, max=100_000)] = 1000,
    threshold: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.99,
    truth_column: Annotated[
        str | None, typer.Option(help="a column with the true person, to print accuracy")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Stream a file's rows, in order, through the worker's incremental resolver."""
    from identity.evaluate import accuracy
    from identity.model import ScoringModel, load_model
    from identity.resolver import replay as run_replay
    from pipelines.cli_output import print_json, progress

    try:
        scoring = ScoringModel(load_model(model), threshold=threshold)
    except (OSError, ValueError) as exc:
        _fail(f"cannot use model {model}: {exc}")
    rows = _records(input, id_column, map)
    started = time.perf_counter()
    with progress(console) as bar:
        # The resolver reads rows lazily, batch by batch: the bar follows it through the file.
        tracked = bar.track(rows, total=len(rows), description="resolving records")
        result = run_replay(tracked, scoring, batch_size=batch_size)
    elapsed = time.perf_counter() - started
    clusters_out.parent.mkdir(parents=True, exist_ok=True)
    with clusters_out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["record_id", "person_id"])
        for input_id, person in result.person_of.items():
            writer.writerow([input_id, person])
    persons = len(set(result.person_of.values()))
    score = (
        accuracy(result.person_of, _truth(input, id_column, truth_column)) if truth_column else None
    )
    if as_json:
        print_json(
            {
                "records": result.records,
                "persons": persons,
                "seconds": elapsed,
                "records_per_second": result.records / elapsed if elapsed else None,
                "out": str(clusters_out),
                "accuracy": score.__dict__ if score else None,
            }
        )
        return
    console.print(
        f"{result.records:,} records -> {persons:,} persons in {elapsed:.1f} s "
        f"({result.records / elapsed:,.0f} records/s); wrote {clusters_out}"
    )
    if score is not None:
        out.print_json(orjson.dumps(score.__dict__).decode())


def _truth(path: Path, id_column: str, truth_column: str) -> dict[str, str]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = (
        pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
        if path.suffix.lower() == ".csv"
        else pq.read_table(path)
    )
    if truth_column not in table.column_names:
        _fail(f"truth column {truth_column!r} is not in {path.name}")
    ids = table.column(id_column).cast("string").to_pylist()
    return dict(zip(ids, table.column(truth_column).cast("string").to_pylist(), strict=True))


@identity_app.command()
def explain(
    person_id: Annotated[str, typer.Argument(help="the person to explain")],
    api: Annotated[str, typer.Option(envvar="TESSERA_API", help="profile API base URL")] = (
        "http://127.0.0.1:8080"
    ),
    as_json: Annotated[bool, typer.Option("--json", help="print the raw JSON")] = False,
    api_key: Annotated[
        str, typer.Option(envvar="TESSERA_API_KEY", help="an auditor or admin API key")
    ] = "",
) -> None:
    """Show every record of a person and the link that holds it: rule or match weight."""
    import httpx

    try:
        response = httpx.get(
            f"{api.rstrip('/')}/v1/identity/{person_id}/explain",
            headers={"X-API-Key": api_key},
            timeout=10,
        )
    except httpx.HTTPError as exc:
        _fail(
            f"cannot reach the API at {api}: {exc}. Start one with `tessera up` or `tessera serve`."
        )
    if response.status_code != 200:
        _fail(f"{response.status_code}: {response.text}")
    body = response.json()
    if as_json:
        out.print_json(response.text)
        return
    out.print(
        f"[bold]{body['person_id']}[/]: {len(body['records'])} records, {len(body['links'])} links"
    )
    table = Table("link", "records", "rule", "match weight", "evidence")
    for link in body["links"]:
        evidence = ", ".join(
            f"{name} {c['match_weight']:+.1f} ({c['level']})"
            for name, c in (link.get("comparisons") or {}).items()
        )
        weight = link.get("match_weight")
        table.add_row(
            link["link_id"],
            f"{link['record_l']} ~ {link['record_r']}",
            link["rule"],
            f"{weight:+.2f}" if weight is not None else "",
            evidence,
        )
    out.print(table)


@identity_app.command("reject-link")
def reject_link(
    record_a: Annotated[str, typer.Argument(help="one record of the link")],
    record_b: Annotated[str, typer.Argument(help="the other record")],
    reason: Annotated[str, typer.Option(help="why these are not one person")],
    bootstrap: Annotated[
        str, typer.Option("--bootstrap", envvar="TESSERA_BOOTSTRAP", help="Kafka HOST:PORT")
    ],
    operator: Annotated[str, typer.Option(help="who decides")] = "cli",
) -> None:
    """Tell the worker two records are not one person: it splits them and never relinks them."""
    from pipelines.broker import BrokerError, ensure_reachable
    from pipelines.identity_commands import reject_link_command
    from pipelines.kafka import BatchProducer

    try:
        ensure_reachable(bootstrap)
    except BrokerError as exc:
        _fail(str(exc))
    command = reject_link_command(record_a, record_b, reason, operator)
    producer = BatchProducer(bootstrap)
    try:
        producer.send([command])
    finally:
        producer.close()
    console.print(
        f"sent {orjson.loads(command.value)['command_id']}: the worker applies it next batch"
    )


@identity_app.command()
def generate(
    records_out: Annotated[Path, typer.Option("--out", help="CSV to write")],
    persons: Annotated[int, typer.Option(min=1, max=2_000_000)] = 2000,
    seed: int = 1,
    as_json: AsJson = False,
) -> None:
    """Write the hard synthetic identity set (households, twins, tablets, typos) with its truth."""
    from pipelines.cli_output import print_json, progress
    from synthetic.identities import write_identity_records

    with progress(console) as bar:
        task = bar.add_task("writing identity records", total=None)
        count = write_identity_records(
            records_out, persons, seed, progress=lambda n: bar.update(task, completed=n)
        )
    if as_json:
        print_json({"out": str(records_out), "records": count, "persons": persons, "seed": seed})
        return
    console.print(
        f"wrote {count:,} records of {persons:,} persons to {records_out} (truth: person_id)"
    )


@identity_app.command()
def bench(
    records: Annotated[str, typer.Option(help="comma-separated sizes, e.g. 100000,1000000")] = (
        "100000"
    ),
    threshold: float = 0.99,
    batch_size: int = 1000,
    events: Annotated[
        int, typer.Option(help="also the event stream of `tessera generate` (0: skip)")
    ] = 100_000,
    write: Annotated[Path, typer.Option(help="BENCHMARKS.md to update")] = Path("BENCHMARKS.md"),
) -> None:
    """Streaming resolver vs Splink batch: accuracy, throughput, latency, memory."""
    from pipelines.bench_identity import (
        render,
        run_event_stream_bench,
        run_identity_bench,
        write_section,
    )

    command = f"tessera identity bench --records {records} --events {events}"
    figures = []

    def written(result: dict[str, object]) -> None:
        # Each size is written as it finishes: a long run that is stopped keeps the rest.
        figures.append(result)
        write_section(write, render(figures, command))

    if events:
        with console.status(f"identity bench on the event stream ({events:,} events)"):
            written(run_event_stream_bench(max(10, events // 40), events, threshold, batch_size))
    for size in (int(s) for s in records.split(",") if s.strip()):
        with console.status(f"identity bench on ~{size:,} records"):
            written(run_identity_bench(size, threshold, batch_size))
    out.print(render(figures, command))
