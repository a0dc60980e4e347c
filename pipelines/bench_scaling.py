"""Scaling: throughput with one and two Faust workers, Flink parallelism 1 and 2.

Writes (or replaces) the "Scaling" section of BENCHMARKS.md. Every configuration reads
the same generated events from a fresh embedded broker (input topics with as many
partitions as the most parallel configuration uses) and is timed the same way, from
outside and engine-neutrally: on the broker timestamps of its outputs (a lineage entry
or a dead letter per event, keyed by event), from the moment a fifth of the events have
their outcome to the moment the last one has. Start-up, group joins and the first batch
stay out of every figure alike. Each figure is a ratio to the single worker in the same
run.

    python -m pipelines.bench_scaling --events 100000
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from pipelines import topics
from pipelines.bench import END, machine
from pipelines.bench_identity import write_section
from pipelines.broker import EmbeddedBroker
from pipelines.bundles import decode_bundle
from pipelines.produce import produce_events, read_lines

SECTION = "## Scaling"
PARTITIONS = 4
WARM_UP = 0.2  # outcomes before the clock starts: start-up and the first batches


@dataclass
class Run:
    """One configuration's result: events/s, and for the split, the ingest tier's rate."""

    name: str
    rate: float
    forward_rate: float | None = None


def _spawn(args: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", *args],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a Flink run's JVM is stopped with it
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _reader(bootstrap: str, topic: str) -> Consumer:
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"bench-scaling-{topic}-{os.getpid()}"}
    )
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    return consumer


def outcome_rate(
    bootstrap: str,
    expected: int,
    processes: Sequence[subprocess.Popen[bytes]],
    timeout: float = 3600,
) -> float:
    """Events/s between the WARM_UP share of outcomes and the last one, by broker time.

    An outcome is the first lineage entry or dead letter of an event key (outputs are
    at-least-once: a replayed batch's outputs do not count twice).
    """
    consumers = [_reader(bootstrap, t) for t in (topics.LINEAGE, topics.REJECTED)]
    first_seen: dict[bytes, int] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(first_seen) < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(first_seen)} of {expected} outcomes in {timeout} s")
            for process in processes:
                if process.poll() is not None:
                    raise RuntimeError(f"a worker exited with {process.returncode}")
            for consumer in consumers:
                for message in consumer.consume(num_messages=10_000, timeout=0.2):
                    if message.error() is None:
                        first_seen.setdefault(message.key(), message.timestamp()[1])
    finally:
        for consumer in consumers:
            consumer.close()
    times = sorted(first_seen.values())
    start = int(len(times) * WARM_UP)
    return (len(times) - start) / max((times[-1] - times[start]) / 1000, 1e-3)


def forward_rate(bootstrap: str) -> float:
    """Records/s the ingest workers forwarded, by the broker times of their bundles."""
    consumer = _reader(bootstrap, topics.STAGE_INPUT)
    stamps: list[tuple[int, int]] = []
    try:
        while batch := consumer.consume(num_messages=1000, timeout=3):
            stamps += [
                (m.timestamp()[1], len(decode_bundle(m.value()))) for m in batch if not m.error()
            ]
    finally:
        consumer.close()
    stamps.sort()
    start = int(len(stamps) * WARM_UP)
    records = sum(n for _, n in stamps[start + 1 :])
    return records / max((stamps[-1][0] - stamps[start][0]) / 1000, 1e-3)


def run_config(
    name: str,
    lines: list[bytes],
    expected: int,
    folder: Path,
    workers: list[list[str]],
    batch_size: int,
) -> Run:
    """Produce the events to a fresh broker, start `workers`, time their outcomes."""
    with EmbeddedBroker(partitions=PARTITIONS) as broker:
        produce_events(lines, broker.bootstrap)
        common = ["--bootstrap", broker.bootstrap, "--batch-size", str(batch_size)]
        processes = [
            _spawn(
                ["worker", *args, *common, "--data-dir", str(folder / f"w{i}")],
                folder / "logs" / f"w{i}.log",
            )
            for i, args in enumerate(workers)
        ]
        try:
            rate = outcome_rate(broker.bootstrap, expected, processes)
            split = any("ingest" in args for args in workers)
            forwarded = forward_rate(broker.bootstrap) if split else None
        finally:
            for process in processes:
                _stop(process)
    return Run(name, rate, forwarded)


def run_scaling(
    events: int, workdir: Path, batch_size: int = 2000, flink: bool = True
) -> list[Run]:
    """Every configuration over the same events; the single worker first (the baseline)."""
    from synthetic.events import write_dataset

    workdir.mkdir(parents=True, exist_ok=True)
    events_file, truth_file = workdir / "events.jsonl", workdir / "truth.csv"
    write_dataset(
        events_file, truth_file, persons=max(10, events // 50), events=events, seed=7, end=END
    )
    lines = list(read_lines(events_file))
    with truth_file.open() as handle:
        expected = sum(
            1 for row in csv.DictReader(handle) if row["expected_outcome"] != "duplicate"
        )
    ingest, stages = ["--role", "ingest"], ["--role", "stages"]
    configs: list[tuple[str, list[list[str]]]] = [
        ("Faust, 1 worker (`--role all`)", [[]]),
        ("Faust, 1 ingest worker + stage owner", [stages, ingest]),
        ("Faust, 2 ingest workers + stage owner", [stages, ingest, ingest]),
    ]
    if flink:
        configs += [
            ("Flink, parallelism 1", [["--engine", "flink", "--parallelism", "1"]]),
            (
                "Flink, parallelism 2 (source; stages at 1)",
                [["--engine", "flink", "--parallelism", "2"]],
            ),
        ]
    runs = []
    for index, (name, workers) in enumerate(configs):
        runs.append(run_config(name, lines, expected, workdir / f"c{index}", workers, batch_size))
        print(f"{name}: {runs[-1].rate:,.0f} events/s", flush=True)
    return runs


def render(runs: list[Run], events: int, command: str) -> str:
    """The BENCHMARKS.md section: figures, ratios to the single worker, the projection."""
    base = runs[0].rate
    lines = [
        SECTION,
        "",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; machine: {machine()}",
        f"- command: `{command}`",
        f"- {events:,} generated events (seed 7) on input topics with {PARTITIONS} partitions, "
        "a fresh embedded broker per configuration; batch 2,000",
        "- timed from the outside on the broker times of the outputs, from a fifth of the "
        "outcomes to the last (start-up, group joins and first batches excluded alike)",
        "- the machine (2 cores) was shared with other workloads, and the broker, "
        "every worker and the timer run on those same 2 cores",
        "",
        "| configuration | events/s | ratio to 1 worker |",
        "|---|---:|---:|",
    ]
    lines += [f"| {r.name} | {r.rate:,.0f} | {r.rate / base:.2f} |" for r in runs]
    split = [r for r in runs if r.forward_rate]
    if split:
        lines += [
            "",
            "Headroom of the stage owner (ingest tier's forwarding rate over the owner's):",
        ]
        lines += [
            f"- {r.name}: ingest forwarded {r.forward_rate:,.0f} records/s, the owner decided "
            f"{r.rate:,.0f} events/s: headroom {r.forward_rate / r.rate:.1f}x"
            for r in split
            if r.forward_rate
        ]
    lines += ["", *PROJECTION, ""]
    return "\n".join(lines)


PROJECTION = """### Reading the figures, and a projection for N machines

Two cores bound what two workers can show here: the broker, the stage owner, the ingest
workers and the measuring consumer share them, so a second worker process mostly
competes for the same CPU. A ratio near 1 here says the design adds no cost, not that
it cannot scale; the projection below says where more machines help.

What the Faust split parallelises is consumption: Faust's per-message cost in Python
(about a fifth of a single worker's time in the `## 100,000 events` figures: the bare
consumer's rate against the worker's) moves to the ingest workers, and the owner reads
one bundle per micro-batch and always works on full batches. Everything with global
state stays on the one owner: quality's order lookups, consent, identity resolution,
lineage and profiles. So the split gains over one worker once, and a second ingest
worker adds nothing while one already forwards at several times the owner's rate (the
headroom): 1 and 2 ingest workers measure the same, within noise.

Projection for N machines, each with the cores of this one:

- **Ingest workers** scale with N up to the input partition count (12 in
  `deploy/config/kafka-topics.yaml`): each forwards at several times the owner's rate
  (the headroom above), so one or two are enough until the owner is faster.
- **The stage owner** does not grow with N: its ceiling is the single-worker stage rate
  (see `stages alone, no Kafka` in `## 100,000 events`) plus the consumption it no longer
  does. It is the bottleneck from the first ingest worker on; it scales up (a faster
  core, a larger `--batch-size`), not out.
- **Flink**: parallelism spreads the Kafka source (Java) over task slots and machines;
  the stage operator stays at parallelism 1 for the same reason the owner is one process.
  Flink's ceiling is therefore the same stage rate; parallelism > 1 helps only while
  deserialisation and fetching are a visible share.
- **Where the bottleneck moves next**: beyond one owner, the global state has to be
  partitioned: consent and profiles by person, identity by blocking key with a
  cross-partition merge step (a person whose records block into two partitions needs
  both). That is a different design, not more replicas of this one; until then the
  owner's per-batch work (identity SQL, DuckDB upserts, the great-expectations batch) is
  what to optimise.
- **The broker**: the internal `tessera.stages.input` topic adds one write and one read
  of every event's bytes (about 2x the input traffic on the brokers, no more partitions
  to manage); Kafka brokers handle that far above the owner's rate.
""".splitlines()


def main(
    events: Annotated[int, typer.Option(min=1000)] = 100_000,
    workdir: Annotated[Path, typer.Option(help="scratch space")] = Path(".tessera/bench-scaling"),
    flink: Annotated[bool, typer.Option(help="also run the Flink engine (.venv-flink)")] = True,
    out: Annotated[Path, typer.Option(help="the report to update")] = Path("BENCHMARKS.md"),
) -> None:
    """Measure the scaling configurations and write the Scaling section of BENCHMARKS.md."""
    runs = run_scaling(events, workdir, flink=flink)
    command = f"python -m pipelines.bench_scaling --events {events}" + (
        "" if flink else " --no-flink"
    )
    write_section(out, render(runs, events, command), SECTION)
    print(f"wrote the scaling section of {out}")


if __name__ == "__main__":
    typer.run(main)
