"""One benchmark worker run: consume until N messages, print one JSON line, exit.

`bare` consumes with the same Faust app, agent and batch size as the worker and does
nothing; `pipeline` runs every stage exactly as `tessera worker` does;
`pipeline-quality-off` the same without the quality suites.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
import time
from pathlib import Path

import faust
import orjson

from pipelines.faust_engine import faust_app, source_records
from pipelines.kafka import BatchProducer
from pipelines.pipeline import Pipeline


def main(bootstrap: str, mode: str, expected: int, data_dir: Path, batch_size: int) -> None:
    app, inputs = faust_app(bootstrap, data_dir, f"tessera-bench-{mode}-{os.getpid()}", batch_size)
    staged = mode in ("pipeline", "pipeline-quality-off")
    quality = mode == "pipeline"
    pipeline = Pipeline(data_dir / "state.duckdb", quality=quality) if staged else None
    producer = BatchProducer(bootstrap) if staged else None
    state = {"n": 0, "t0": 0.0, "stage_s": 0.0, "batches": 0}

    @app.agent(inputs)
    async def consume(stream: faust.StreamT) -> None:
        loop = asyncio.get_running_loop()
        async for events in stream.take_events(batch_size, within=0.2):
            if not state["n"]:
                state["t0"] = time.perf_counter()
            if pipeline is not None and producer is not None:
                batch = source_records(events)
                began = time.perf_counter()
                await loop.run_in_executor(None, pipeline.process, batch, producer.send)
                state["stage_s"] += time.perf_counter() - began
                state["batches"] += 1
            state["n"] += len(events)
            if state["n"] >= expected:
                elapsed = time.perf_counter() - state["t0"]
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                result = {
                    "mode": mode,
                    "events": state["n"],
                    "seconds": elapsed,
                    "rate": state["n"] / elapsed,
                    "stage_seconds": state["stage_s"],
                    "batches": state["batches"],
                    "max_rss_mb": rss,
                }
                print(orjson.dumps(result).decode(), flush=True)
                os._exit(0)

    faust.Worker(
        app, loglevel="error", quiet=True, redirect_stdouts=False
    ).execute_from_commandline()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]))
