"""Erasure bench: what sealing costs the stages, and how long one erasure takes.

Writes (or replaces) the "Erasure and sealing" section of BENCHMARKS.md. Run with
`python -m pipelines.bench_erasure --events N` (`make bench` runs it at 100,000).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import orjson

from consent.erasure import erasure_request
from consent.keys import SubjectKeyStore
from identity.normalise import extract_identifiers
from pipelines import topics
from pipelines.bench import END, machine, stage_throughput
from pipelines.bench_identity import write_section
from pipelines.pipeline import Pipeline, SourceRecord
from synthetic.events import generate

SECTION = "## Erasure and sealing"


def subjects_of(lines: list[bytes], count: int) -> list:
    """The first `count` distinct emails the stream carries (the subjects to erase)."""
    found: dict = {}
    for raw in lines:
        try:
            event = orjson.loads(raw)
            ids = extract_identifiers(event) if isinstance(event, dict) else []
        except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError):
            continue
        for identifier in ids:
            if identifier.type == "email":
                found.setdefault(identifier.value, identifier)
        if len(found) >= count:
            break
    return list(found.values())


def run(events: int, batch_size: int, erasures: int, folder: Path) -> dict[str, float]:
    lines = [raw for raw, _ in generate(max(2, events // 50), events, 7, END)]
    plain = stage_throughput(lines, batch_size, folder / "plain.duckdb", quality=False)
    keys = SubjectKeyStore(folder / "keys.sqlite")
    sealed_lines = keys.seal_events(lines)  # what `tessera produce` sends with a key store
    sealed = stage_throughput(
        sealed_lines, batch_size, folder / "sealed.duckdb", quality=False, key_store=keys
    )
    # One erasure at a time on the sealed state, against one ordinary batch on the same state.
    pipeline = Pipeline(folder / "sealed.duckdb", quality=False, key_store=keys)
    offset = len(lines)
    took = []
    for identifier in subjects_of(lines, erasures):
        request = orjson.dumps(erasure_request(identifier, "bench"))
        started = time.perf_counter()
        pipeline.process([SourceRecord(topics.PRIVACY, 0, offset, request)], lambda _o: None)
        took.append(time.perf_counter() - started)
        offset += 1
    pipeline.close()
    return {
        "plain": plain,
        "sealed": sealed,
        "erasure_ms": statistics.median(took) * 1000,
        "batch_ms": batch_size / sealed * 1000,
        "erasures": len(took),
    }


def render(figures: dict[str, float], events: int, batch_size: int, command: str) -> str:
    return "\n".join(
        [
            SECTION,
            "",
            f"- machine: {machine()} (shared with other work while it ran)",
            f"- command: `{command}`; {events:,} synthetic events (seed 7), batches of "
            f"{batch_size:,}, quality suites off in both runs, no Kafka",
            "",
            "| figure | value | baseline | ratio |",
            "|---|---:|---|---:|",
            f"| stages with a key store (sealed input opened, changelog sealed) | "
            f"{figures['sealed']:,.0f} events/s | stages without: {figures['plain']:,.0f} | "
            f"{figures['sealed'] / figures['plain']:.2f} |",
            f"| one erasure (median of {figures['erasures']:.0f}), state of {events:,} events | "
            f"{figures['erasure_ms']:,.0f} ms | one batch of {batch_size:,} events: "
            f"{figures['batch_ms']:,.0f} ms | {figures['erasure_ms'] / figures['batch_ms']:.2f} |",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=5_000)
    parser.add_argument("--erasures", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        figures = run(args.events, args.batch_size, args.erasures, Path(folder))
    command = (
        f"python -m pipelines.bench_erasure --events {args.events} "
        f"--batch-size {args.batch_size} --erasures {args.erasures}"
    )
    section = render(figures, args.events, args.batch_size, command)
    write_section(args.out, section, SECTION)
    print(section)


if __name__ == "__main__":
    main()
