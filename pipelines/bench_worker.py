"""One benchmark worker run: consume until N messages, print one JSON line, exit.

`bare` consumes with the same Faust app, agent and batch size as the worker and does
nothing; `pipeline` runs every stage exactly as `tessera worker` does;
`pipeline-quality-off` the same without the quality suites.

`slow_ms` > 0 injects a slow profile store: every batch's transaction is held open that
long before it commits, for `slow_seconds` from the first batch. Every half second the
run samples its resident memory and how many events it has processed, so the report can
show memory staying flat while the backlog grows (backpressure) instead of growing with it.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import random
import resource
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import faust
import orjson

from pipelines.faust_engine import TesseraWorker, faust_app, ready_batches
from pipelines.kafka import OUTPUT_SETTINGS, BatchProducer
from pipelines.pipeline import OutRecord, Pipeline


def _status_mb(field: str) -> float:
    """A memory field of this process's /proc status (`VmRSS`, `VmHWM`), in MiB (Linux; 0
    where /proc is missing)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def rss_mb() -> float:
    """This process's resident memory now, in MiB."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (VmHWM), in MiB."""
    return _status_mb("VmHWM")


def main(
    bootstrap: str,
    mode: str,
    expected: int,
    data_dir: Path,
    batch_size: int,
    slow_ms: int = 0,
    slow_seconds: float = 0.0,
) -> None:
    app, inputs = faust_app(bootstrap, data_dir, f"tessera-bench-{mode}-{os.getpid()}", batch_size)
    staged = mode in ("pipeline", "pipeline-quality-off")
    quality = mode == "pipeline"
    pipeline = Pipeline(data_dir / "state.duckdb", quality=quality) if staged else None
    producer = BatchProducer(bootstrap, **OUTPUT_SETTINGS) if staged else None
    state = {"n": 0, "t0": 0.0, "first_at": 0.0, "stage_s": 0.0, "emit_s": 0.0, "batches": 0}
    samples: list[tuple[float, float, int]] = []  # (unix time, RSS MiB, events processed)

    def sample() -> None:
        while True:
            samples.append((time.time(), rss_mb(), state["n"]))
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()

    def emit(records: list[OutRecord]) -> None:
        assert producer is not None
        began = time.perf_counter()
        producer.send(records)
        state["emit_s"] += time.perf_counter() - began
        if slow_ms and time.time() - state["first_at"] < slow_seconds:
            time.sleep(slow_ms / 1000)  # the slow store: the batch's commit waits

    @app.agent(inputs)
    async def consume(stream: faust.StreamT) -> None:
        loop = asyncio.get_running_loop()
        # Staged runs cut batches as the worker does; the bare consumer with Faust's own.
        batches = (
            ready_batches(stream, batch_size, 0.2)
            if staged
            else stream.take_events(batch_size, within=0.2)
        )
        async for events in batches:
            if not state["n"]:
                state["t0"], state["first_at"] = time.perf_counter(), time.time()
            if pipeline is not None:
                batch = events.records  # built as the events arrived
                began = time.perf_counter()
                await loop.run_in_executor(None, pipeline.process, batch, emit)
                state["stage_s"] += time.perf_counter() - began
                state["batches"] += 1
            state["n"] += len(events)
            if state["n"] >= expected:
                elapsed = time.perf_counter() - state["t0"]
                if pipeline is not None:
                    pipeline.close()
                result = {
                    "mode": mode,
                    "events": state["n"],
                    "seconds": elapsed,
                    "rate": state["n"] / elapsed,
                    "stage_seconds": state["stage_s"],
                    "emit_seconds": state["emit_s"],
                    "batches": state["batches"],
                    "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "samples": samples,
                    "first_at": state["first_at"],
                }
                print(orjson.dumps(result).decode(), flush=True)
                os._exit(0)

    TesseraWorker(
        app, loglevel="error", quiet=True, redirect_stdouts=False
    ).execute_from_commandline()


def fill_parts(events: int, batch_size: int, parts: int = 10) -> list[tuple[int, int]]:
    """Split `events` fed in batches of `batch_size` into up to `parts` consecutive runs of
    whole batches; returns each run's (first, end) event offsets. Feeding the runs one
    after the other makes exactly the batches of feeding all events at once."""
    batches = -(-events // batch_size)
    bounds = sorted({round(batches * k / parts) for k in range(parts + 1)})
    return [
        (min(a * batch_size, events), min(b * batch_size, events))
        for a, b in itertools.pairwise(bounds)
    ]


def returning_lines(warm: list[bytes], events: int, seed: int) -> list[bytes]:
    """`events` of the warm dataset's events again, as new events of the same persons: a
    seeded sample of them, each with a new messageId and its time a day later (lines that
    are not a JSON object with a time, the generator's bad input, are left out)."""
    rng = random.Random(seed)
    out: list[bytes] = []
    for number in rng.sample(range(len(warm)), len(warm)):
        if len(out) == events:
            break
        try:
            event = orjson.loads(warm[number])
            stated = datetime.fromisoformat(event["timestamp"]) if "messageId" in event else None
        except (orjson.JSONDecodeError, TypeError, KeyError, ValueError):
            continue
        if not isinstance(event, dict) or stated is None:
            continue
        later = stated + timedelta(days=1)
        event["messageId"] = f"returning-{seed}-{len(out)}"
        event["timestamp"] = later.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        out.append(orjson.dumps(event))
    return out


def _write_datasets(folder: Path, persons: int, probe_events: int) -> None:
    """The cost point's inputs: the warm events, the probe's, and the returning ones. In a
    process of its own: the generator holds every event of a dataset to sort it (3.2 GB at
    300,000 persons), which would otherwise be the measured process's peak."""
    from pipelines.bench import END
    from pipelines.produce import read_lines
    from synthetic.events import write_dataset

    warm = folder / "warm.jsonl"
    write_dataset(warm, None, persons=persons, events=2 * persons, seed=7, end=END)
    probe = folder / "probe.jsonl"
    write_dataset(probe, None, persons=probe_events // 50, events=probe_events, seed=8, end=END)
    returning = returning_lines(list(read_lines(warm)), probe_events, seed=9)
    (folder / "returning.jsonl").write_bytes(b"".join(line + b"\n" for line in returning))


def _timed_feed(pipeline: Pipeline, lines: list[bytes], batch_size: int, first: int) -> dict:
    """Feed `lines` (offsets from `first`); wall-clock and CPU seconds of this process."""
    from pipelines.bench import feed

    cpu = time.process_time()
    wall = feed(pipeline, lines, batch_size, first=first)
    cpu = time.process_time() - cpu
    return {
        "events": len(lines),
        "seconds": wall,
        "cpu_seconds": cpu,
        "rate": len(lines) / wall,
        "cpu_rate": len(lines) / cpu,
    }


def cost(
    persons: int, folder: Path, batch_size: int, probe_events: int, fill_batch: int = 0
) -> None:
    """Fill a store with `persons` (two events each on average) in batches of `fill_batch`
    (default `batch_size`), then time a probe of `probe_events` new events of new persons
    in batches of `batch_size`, then of as many events of persons already stored
    (`returning_lines`); print one JSON line.

    Rates are given per wall-clock second and per CPU-second of this process (all its
    threads, DuckDB's included): on a shared machine the first includes waiting for a
    core, the second does not. The fill is timed by tenths, to show how its cost grows
    with the store; each tenth is also reported on stderr as it ends."""
    import duckdb

    from pipelines.produce import read_lines

    fill_batch = fill_batch or batch_size
    folder.mkdir(parents=True, exist_ok=True)
    writer = multiprocessing.get_context("spawn").Process(
        target=_write_datasets, args=(folder, persons, probe_events)
    )
    writer.start()
    writer.join()
    if writer.exitcode != 0:
        raise RuntimeError(f"writing the cost point's events failed (exit {writer.exitcode})")
    state = folder / "state.duckdb"
    for stale in (state, state.with_name(state.name + ".wal")):
        stale.unlink(missing_ok=True)
    pipeline = Pipeline(state)
    warm = folder / "warm.jsonl"
    warm_events = sum(1 for _ in read_lines(warm))
    load_before = os.getloadavg()[0]
    fill = []
    for first, end in fill_parts(warm_events, fill_batch):
        # One tenth of the events in memory at a time: a worker holds a batch, not the topic.
        lines = list(itertools.islice(read_lines(warm), first, end))
        part = _timed_feed(pipeline, lines, fill_batch, first)
        del lines
        part.update(stored=end, rss_mb=rss_mb(), peak_rss_mb=peak_rss_mb(), load=os.getloadavg()[0])
        fill.append(part)
        print(orjson.dumps({"fill": part}).decode(), file=sys.stderr, flush=True)
    rss_before = rss_mb()
    probed = _timed_feed(
        pipeline, list(read_lines(folder / "probe.jsonl")), batch_size, warm_events
    )
    rss_after = rss_mb()
    returning = _timed_feed(
        pipeline,
        list(read_lines(folder / "returning.jsonl")),
        batch_size,
        warm_events + probe_events,
    )
    pipeline.close()
    conn = duckdb.connect(str(state), read_only=True)
    (stored,) = conn.execute("SELECT count(*) FROM id_persons").fetchone()
    conn.close()
    warm_seconds = sum(p["seconds"] for p in fill)
    warm_cpu = sum(p["cpu_seconds"] for p in fill)
    result = {
        "persons": persons,
        "persons_stored": stored,
        "warm_events": warm_events,
        "fill_batch": fill_batch,
        "batch": batch_size,
        "warm_seconds": warm_seconds,
        "warm_cpu_seconds": warm_cpu,
        "warm_rate": warm_events / warm_seconds,
        "warm_cpu_rate": warm_events / warm_cpu,
        "fill": fill,
        "probe_events": probe_events,
        "probe_seconds": probed["seconds"],
        "probe_cpu_seconds": probed["cpu_seconds"],
        "rate": probed["rate"],
        "cpu_rate": probed["cpu_rate"],
        "returning_events": returning["events"],
        "returning_seconds": returning["seconds"],
        "returning_cpu_seconds": returning["cpu_seconds"],
        "returning_rate": returning["rate"],
        "returning_cpu_rate": returning["cpu_rate"],
        "rss_before_mb": rss_before,
        "rss_after_mb": rss_after,
        # The stages' own peak: the events are written by another process, and this one
        # holds a tenth of them at a time.
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "state_mb": state.stat().st_size / 2**20,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }
    print(orjson.dumps(result).decode(), flush=True)


if __name__ == "__main__" and sys.argv[1] == "cost":
    cost(int(sys.argv[2]), Path(sys.argv[3]), *map(int, sys.argv[4:7]))
elif __name__ == "__main__":
    main(
        sys.argv[1],
        sys.argv[2],
        int(sys.argv[3]),
        Path(sys.argv[4]),
        int(sys.argv[5]),
        *(int(sys.argv[6]), float(sys.argv[7])) if len(sys.argv) > 7 else (),
    )
