"""Broker storage bench: the embedded broker on S3 storage (a loopback moto server) against
memory storage, on the same produce and consume workload.

Writes (or replaces) the "Broker storage" section of BENCHMARKS.md. Run with
`python -m pipelines.bench_broker --records N`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from pipelines import topics
from pipelines.bench import machine
from pipelines.bench_identity import write_section
from pipelines.broker import EmbeddedBroker, LocalS3
from pipelines.kafka import BatchProducer, read_topic
from pipelines.pipeline import OutRecord

SECTION = "## Broker storage"
TOPIC = topics.BEHAVIORAL


def records(count: int, size: int) -> Iterator[OutRecord]:
    """`count` keyed records of `size` bytes each."""
    for i in range(count):
        key = f"event-{i:09d}".encode()
        yield OutRecord(TOPIC, key, key.ljust(size, b"x"))


def measure(broker: EmbeddedBroker, count: int, size: int) -> dict[str, float]:
    """Produce `count` records (acknowledged, as the worker produces) and read them back;
    on S3 storage, then restart the broker and time from its start until every record
    read back. Out: records/s produced and consumed, and that time in seconds."""
    with broker:
        producer = BatchProducer(broker.bootstrap)
        started = time.perf_counter()
        producer.send(records(count, size), timeout=600)
        produced = time.perf_counter() - started
        producer.close()
        started = time.perf_counter()
        seen = len(read_topic(broker.bootstrap, TOPIC))
        consumed = time.perf_counter() - started
        if seen != count:
            raise RuntimeError(f"read back {seen} of {count} records")
        figures = {"produce": count / produced, "consume": count / consumed}
        if broker.storage is not None:
            broker.stop()
            started = time.perf_counter()
            broker.start(create=False)
            if len(read_topic(broker.bootstrap, TOPIC)) != count:
                raise RuntimeError("records lost across a broker restart")
            figures["restart_read_s"] = time.perf_counter() - started
    return figures


def run(count: int, size: int, rounds: int) -> dict[str, dict[str, float]]:
    """The best of `rounds` alternating runs on memory storage (the baseline) and on S3
    storage: alternating keeps a change in the shared machine's load from favouring one."""
    runs: dict[str, list[dict[str, float]]] = {"memory": [], "s3": []}
    for _ in range(rounds):
        runs["memory"].append(measure(EmbeddedBroker(), count, size))
        with LocalS3() as store:  # an empty bucket each time, as memory starts empty
            runs["s3"].append(measure(EmbeddedBroker(storage=store.storage), count, size))
    best = {"produce": max, "consume": max, "restart_read_s": min}
    return {
        storage: {
            key: pick(r[key] for r in results) for key, pick in best.items() if key in results[0]
        }
        for storage, results in runs.items()
    }


def render(
    figures: dict[str, dict[str, float]], count: int, size: int, rounds: int, command: str
) -> str:
    memory, s3 = figures["memory"], figures["s3"]
    rows = [
        f"| {what} | {s3[key]:,.0f} records/s | memory storage: {memory[key]:,.0f} | "
        f"{s3[key] / memory[key]:.2f} |"
        for what, key in (("produce, acknowledged", "produce"), ("consume", "consume"))
    ]
    return "\n".join(
        [
            SECTION,
            "",
            f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {machine()} "
            "(shared with other work while it ran)",
            f"- command: `{command}`; {count:,} keyed records of {size} B on one partition, "
            "produced with the worker's producer (idempotent, flushed) and read back with "
            f"confluent-kafka; a fresh embedded broker per run; best of {rounds} runs per "
            "storage, alternating",
            "- S3 storage: a loopback moto server (`LocalS3`), the storage the broker-restart "
            "fault test runs on; memory storage is the default and the baseline",
            "",
            "| figure (S3 storage) | value | baseline | ratio |",
            "|---|---:|---|---:|",
            *rows,
            "",
            f"After a restart on S3 storage, {s3['restart_read_s']:.1f} s passed from starting "
            "the broker to every record read back.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args()
    figures = run(args.records, args.size, args.rounds)
    command = (
        f"python -m pipelines.bench_broker --records {args.records} --size {args.size} "
        f"--rounds {args.rounds}"
    )
    section = render(figures, args.records, args.size, args.rounds, command)
    write_section(args.out, section, SECTION)
    print(section)


if __name__ == "__main__":
    main()
