"""The `tessera` command line."""

from __future__ import annotations

import contextlib
import enum
import logging
import shlex
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pipelines.broker import BrokerError
from pipelines.dlq import dlq_app
from pipelines.privacy_cli import privacy_app
from pipelines.quality_cli import quality_app, schemas_app

# Up to this many events per micro-batch; a batch closes sooner after --batch-ms, so large
# batches form only under a backlog, where they amortise each stage's fixed per-batch cost
# (quality suites, identity scoring, profile queries): ~2x the events per CPU-second of 2,000.
DEFAULT_BATCH = 10_000

app = typer.Typer(
    name="tessera",
    help="Tessera: real-time customer-data unification over Kafka.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Sub-apps live in their own modules: `tessera dlq ...`, `tessera quality ...`, `tessera schemas ...`,
# `tessera privacy ...`.
app.add_typer(dlq_app, name="dlq")
app.add_typer(quality_app, name="quality")
app.add_typer(schemas_app, name="schemas")
app.add_typer(privacy_app, name="privacy")
console = Console(stderr=True)

Bootstrap = Annotated[
    str, typer.Option("--bootstrap", envvar="TESSERA_BOOTSTRAP", help="Kafka bootstrap HOST:PORT")
]
DataDir = Annotated[
    Path, typer.Option("--data-dir", envvar="TESSERA_DATA_DIR", help="where state files live")
]


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(2)


class Engine(enum.StrEnum):
    faust = "faust"
    flink = "flink"


class Role(enum.StrEnum):
    all = "all"
    ingest = "ingest"
    stages = "stages"


@app.command()
def worker(
    bootstrap: Bootstrap,
    data_dir: DataDir = Path(".tessera/worker"),
    batch_size: Annotated[int, typer.Option(min=1, max=100_000)] = DEFAULT_BATCH,
    batch_ms: Annotated[int, typer.Option(min=1, max=60_000)] = 200,
    loglevel: Annotated[str, typer.Option(help="crit|error|warn|info|debug")] = "warn",
    identity_model: Annotated[
        Path | None,
        typer.Option(
            envvar="TESSERA_IDENTITY_MODEL",
            help="Splink model JSON from `tessera identity train`; without it, deterministic links only",
        ),
    ] = None,
    identity_threshold: Annotated[
        float, typer.Option(min=0.5, max=0.999999, help="match probability that links records")
    ] = 0.99,
    engine: Annotated[
        Engine, typer.Option(help="faust (one process) or flink (a PyFlink job, .venv-flink)")
    ] = Engine.faust,
    metrics_port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="serve Prometheus metrics on this port (faust engine)"),
    ] = None,
    metrics_host: Annotated[str, typer.Option(help="address the metrics port binds")] = "127.0.0.1",
    role: Annotated[
        Role,
        typer.Option(
            envvar="TESSERA_WORKER_ROLE",
            help="faust only: all (one worker does everything), ingest (many: share the input "
            "partitions, forward to the owner) or stages (the one stage owner behind them)",
        ),
    ] = Role.all,
    parallelism: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="flink only, local mini-cluster: the Kafka source's parallelism "
            "(default: the CPU count); the stages always run at 1",
        ),
    ] = None,
) -> None:
    """Run the stream worker: contract, consent, identity and profiles over the input topics."""
    # A stop asked for while still starting (nothing consumed yet) is a clean stop too; the
    # engine replaces this with its own handler, which finishes the batch in flight.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    from identity.model import ScoringModel, load_model
    from pipelines.broker import ensure_reachable

    model = None
    if identity_model is not None:
        try:
            model = ScoringModel(load_model(identity_model), threshold=identity_threshold)
        except (OSError, ValueError) as exc:
            _fail(f"cannot use identity model {identity_model}: {exc}")
    if engine is Engine.flink and role is not Role.all:
        _fail("--role is for the Faust engine (the Flink job runs every stage in one job)")
    if engine is Engine.flink:
        from pipelines.flink_launch import FlinkUnavailable, run_in_flink_python

        try:
            run_in_flink_python(sys.argv[1:])  # returns only where PyFlink imports
        except FlinkUnavailable as exc:
            _fail(str(exc))
    try:
        ensure_reachable(bootstrap)
    except BrokerError as exc:
        _fail(str(exc))
    if engine is Engine.flink:
        from pipelines.flink_engine import run_worker as run_flink

        run_flink(
            bootstrap,
            data_dir,
            batch_size=batch_size,
            batch_ms=batch_ms,
            identity_model=identity_model,
            identity_threshold=identity_threshold,
            parallelism=parallelism,
        )
        return
    if role is Role.ingest:
        from pipelines.ingest import run_ingest_worker

        run_ingest_worker(
            bootstrap, data_dir, loglevel=loglevel, batch_size=batch_size, batch_ms=batch_ms
        )
        return
    from pipelines.faust_engine import run_worker

    if metrics_port is not None:
        from pipelines.worker_metrics import serve_metrics

        serve_metrics(metrics_port, metrics_host)
    run_worker(
        bootstrap,
        data_dir,
        loglevel=loglevel,
        identity_model=model,
        role=role.value,
        batch_size=batch_size,
        batch_ms=batch_ms,
    )


@app.command()
def serve(
    bootstrap: Bootstrap,
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8080,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    data_dir: DataDir = Path(".tessera/api"),
    keys: Annotated[
        Path | None, typer.Option(help="API keys YAML (default: $TESSERA_API_KEYS)")
    ] = None,
    cache_entries: Annotated[
        int, typer.Option(min=0, help="profile documents kept in memory (about 1 KB each)")
    ] = 50_000,
    warm: Annotated[
        bool,
        typer.Option(
            help="load stored documents and the identifier index into memory before serving"
        ),
    ] = False,
) -> None:
    """Serve the profile API from this process's own replica of the output topics."""
    import uvicorn

    from pipelines.broker import ensure_reachable
    from pipelines.kafka import BatchProducer
    from pipelines.replica import ReplicaFollower
    from profiles.access import KeyringError, configured_keyring
    from profiles.api import create_app
    from profiles.store import ProfileStore

    try:
        ensure_reachable(bootstrap)
    except BrokerError as exc:
        _fail(str(exc))
    try:
        keyring = configured_keyring(keys)
    except KeyringError as exc:
        _fail(str(exc))
    data_dir.mkdir(parents=True, exist_ok=True)
    from consent.keys import configured_key_store

    # TESSERA_KEY_STORE: the worker's per-subject keys, to open sealed changelog documents.
    store = ProfileStore(
        data_dir / "profiles.duckdb", keys=configured_key_store(), cache_entries=cache_entries
    )
    if warm:
        # A store that fits in memory answers every lookup without a query.
        store.warm()
    else:
        # Lookups by identifier from memory all the same (about 20 bytes an identifier):
        # a miss answered by a point query cost ~0.5-1 ms of the event loop's CPU.
        store.load_identifiers()
    follower = ReplicaFollower(store, bootstrap).start()
    producer = BatchProducer(bootstrap)
    try:
        app = create_app(
            store,
            follower,
            send_command=lambda record: producer.send([record]),
            keyring=keyring,
            bootstrap=bootstrap,
        )
        # The request path of a web page: uvloop, the C HTTP parser, no access log.
        uvicorn.run(
            app,
            host=host,
            port=port,
            loop="uvloop",
            http="httptools",
            log_level="warning",
            access_log=False,
        )
    finally:
        follower.stop()
        producer.close()
        store.close()


@app.command()
def generate(
    out: Annotated[Path, typer.Option("--out", help="JSONL file to write")],
    persons: Annotated[int, typer.Option(min=1)] = 1000,
    events: Annotated[int, typer.Option(min=1)] = 50_000,
    seed: int = 7,
    truth: Annotated[Path | None, typer.Option(help="ground-truth CSV to write")] = None,
    end: Annotated[
        datetime | None, typer.Option(help="last event time (UTC); default today 00:00")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Write a realistic, seeded synthetic event stream (and its ground truth)."""
    from pipelines.cli_output import counts_table, print_json, progress
    from synthetic.events import write_dataset

    end = end or datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if end.tzinfo is None:
        end = end.replace(tzinfo=UTC)
    with progress(console) as bar:
        task = bar.add_task("generating events", total=events)
        summary = write_dataset(
            out,
            truth,
            persons=persons,
            events=events,
            seed=seed,
            end=end,
            progress=lambda n: bar.update(task, completed=n),
        )
    if as_json:
        print_json(
            {
                "out": str(out),
                "truth": str(truth) if truth else None,
                "events": summary.events,
                "persons": summary.persons,
                "by_kind": dict(summary.by_kind),
                "by_outcome": dict(summary.by_outcome),
            }
        )
        return
    console.print(counts_table("expected outcomes", dict(summary.by_outcome), "outcome"))
    console.print(f"wrote {summary.events:,} events for {summary.persons:,} persons to {out}")


@app.command()
def produce(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL events")],
    bootstrap: Bootstrap,
    as_json: Annotated[bool, typer.Option("--json", help="print events per topic as JSON")] = False,
) -> None:
    """Send a JSONL file's events to their input topics, routed by kind.

    Bytes go untouched, or sealed for their subjects when $TESSERA_KEY_STORE is set.
    """
    from consent.keys import configured_key_store
    from pipelines.broker import ensure_reachable
    from pipelines.cli_output import counts_table, print_json, progress
    from pipelines.produce import produce_events, read_lines

    try:
        ensure_reachable(bootstrap)
    except BrokerError as exc:
        _fail(str(exc))
    lines = sum(1 for _ in read_lines(file))
    with progress(console) as bar:
        task = bar.add_task(f"producing to {bootstrap}", total=lines)
        per_topic = produce_events(
            read_lines(file),
            bootstrap,
            progress=lambda n: bar.advance(task, n),
            keys=configured_key_store(),  # TESSERA_KEY_STORE: seal each event for its subjects
        )
    if as_json:
        print_json({"bootstrap": bootstrap, "events": sum(per_topic.values()), "topics": per_topic})
        return
    console.print(counts_table(f"events produced to {bootstrap}", dict(per_topic), "topic"))


@app.command()
def up(
    data_dir: DataDir = Path(".tessera/stack"),
    port: Annotated[int, typer.Option(help="API port")] = 8080,
) -> None:
    """Run the embedded stack (broker, worker, API) until Ctrl-C."""
    from pipelines.stack import LocalStack

    with LocalStack(data_dir, api_port=port) as stack:
        console.print(f"broker    [bold]{stack.bootstrap}[/]")
        console.print(f"API       [bold]{stack.api_url}[/]  (try {stack.api_url}/v1/stats)")
        console.print(f"console   [bold]{stack.api_url}/console/[/]")
        console.print(f"metrics   {stack.api_url}/metrics  {stack.worker_metrics_url}")
        console.print(f"logs      {data_dir / 'logs'}")
        console.print("Ctrl-C to stop.")
        _wait_for_interrupt()


def _wait_for_interrupt() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        signal.pause()


@app.command()
def demo(
    persons: Annotated[int, typer.Option(min=10)] = 500,
    events: Annotated[int, typer.Option(min=100)] = 20_000,
    seed: int = 7,
    keep_running: Annotated[bool, typer.Option(help="leave the stack up afterwards")] = False,
    data_dir: DataDir = Path(".tessera/demo"),
) -> None:
    """Start the embedded stack, stream synthetic events through every stage, print what happened."""
    from pipelines.demo import run_demo

    try:
        run_demo(
            console,
            data_dir,
            persons=persons,
            events=events,
            seed=seed,
            keep_running=keep_running,
            wait=_wait_for_interrupt,
        )
    except BrokerError as exc:
        _fail(str(exc))


@app.command()
def bench(
    sizes: Annotated[str, typer.Option(help="comma-separated event counts")] = "100000",
    batch_size: Annotated[int, typer.Option(min=1)] = DEFAULT_BATCH,
    persons: Annotated[
        str, typer.Option(help="cost curve: comma-separated person counts ('' skips)")
    ] = "10000,100000",
    freshness_rates: Annotated[
        str, typer.Option(help="freshness: comma-separated steady rates, events/s ('' skips)")
    ] = "5000",
    freshness_seconds: Annotated[float, typer.Option(help="how long each rate runs")] = 30,
    backpressure_events: Annotated[int, typer.Option(help="0 skips")] = 100_000,
    soak_events: Annotated[int, typer.Option(help="kill -9 soak; 0 skips")] = 20_000,
    out: Annotated[Path, typer.Option(help="report to write")] = Path("BENCHMARKS.md"),
    workdir: Annotated[Path, typer.Option(help="scratch space")] = Path(".tessera/bench"),
    as_json: Annotated[bool, typer.Option("--json", help="print the figures as JSON")] = False,
) -> None:
    """Measure throughput, freshness, cost, backpressure and a kill -9 soak against
    baselines from the same run, and write them to BENCHMARKS.md."""
    from rich.table import Table

    from pipelines.bench import run_bench, run_live, summary, write_report
    from pipelines.cli_output import print_json, progress

    def numbers(text: str) -> list[int]:
        return [int(s.replace("_", "")) for s in text.split(",") if s.strip()]

    command = shlex.join(["tessera", *sys.argv[1:]])  # as typed: an empty list stays ''
    counts = numbers(sizes)
    results = []
    with progress(console) as bar:
        task = bar.add_task("benchmark sizes", total=len(counts))
        for count in counts:  # one size at a time: the same run, with progress between sizes
            bar.update(task, description=f"benchmarking {count:,} events")
            results += run_bench(
                [count], persons_per_event=0.02, workdir=workdir, batch_size=batch_size
            )
            bar.advance(task)
    live = run_live(
        workdir,
        batch_size,
        persons=numbers(persons),
        rates=numbers(freshness_rates),
        freshness_seconds=freshness_seconds,
        backpressure_events=backpressure_events,
        soak_events=soak_events,
    )
    write_report(out, results, command, live)
    if as_json:
        print_json({**summary(results), **live})
        return
    table = Table("events", "figure", "value", "unit", "ratio to baseline", title="benchmarks")
    for size, figures in results:
        for figure in figures:
            ratio = figure.ratio
            table.add_row(
                f"{size:,}",
                figure.name,
                f"{figure.value:,.1f}",
                figure.unit,
                f"{ratio:.2f}× {figure.baseline_name}" if ratio is not None else "",
            )
    console.print(table)
    if live:
        console.print_json(data=live)
    console.print(f"written to {out}")


from pipelines.identity_cli import identity_app  # noqa: E402  (sub-commands after the app)
from pipelines.profiles_cli import profiles_app  # noqa: E402

app.add_typer(identity_app, name="identity")
app.add_typer(profiles_app, name="profiles")

from pipelines.audit_cli import audit_app  # noqa: E402

app.add_typer(audit_app, name="audit")


def main() -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    app()


if __name__ == "__main__":
    main()
