"""The replica's apply: CPU seconds of `ProfileStore.apply` per 10,000 input events, no Kafka.

`python -m pipelines.bench_replica --events 100000 --chunks 1500 --baseline DIR` runs the
synthetic stream (seed 7, as `bench_stages`) through the stages once, keeps their output
records, and applies those the replica follows to a fresh store in chunks of `--chunks`
records (what a follower's fetch hands to one `apply`), in consumed order, timing the
process's CPU (DuckDB's threads included) over every apply and a checkpoint after the
last (the applies' share of checkpoints). Each run is a process of its own, the code
under test chosen by PYTHONPATH; the baseline's runs and this checkout's alternate,
`--rounds` of each. The tables of the two stores are compared (row counts and an
order-free digest), the wall-clock fields of the outputs left out as `bench_stages` does.

Like the live API, each run moves what it holds before the clock (the records to apply)
out of the garbage collector's way (`gc.freeze`), as the API does once it has warmed.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson


def _apply_run(outputs: Path, db: Path, chunk: int) -> dict:
    """One measured run of this interpreter's `ProfileStore.apply` over `outputs`."""
    from pipelines.bench_stages import table_digests
    from profiles.store import FOLLOWED_TOPICS, ConsumedRecord, ProfileStore

    for stale in (db, db.with_name(db.name + ".wal")):
        stale.unlink(missing_ok=True)
    offsets: dict[str, int] = {}
    records = []
    for line in outputs.read_bytes().splitlines():
        out = orjson.loads(line)
        if out["topic"] not in FOLLOWED_TOPICS:
            continue
        offset = offsets[out["topic"]] = offsets.get(out["topic"], -1) + 1
        records.append(
            ConsumedRecord(
                out["topic"],
                0,
                offset,
                None if out["key"] is None else out["key"].encode(),
                None if out["value"] is None else out["value"].encode(),
                tuple((name, data.encode()) for name, data in out["headers"]),
            )
        )
    store = ProfileStore(db)
    gc.collect()
    gc.freeze()
    cpu0 = time.process_time()
    for start in range(0, len(records), chunk):
        store.apply(records[start : start + chunk])
    store.conn.execute("CHECKPOINT")
    cpu = time.process_time() - cpu0
    tables = table_digests(store.conn)
    store.close()
    applies = -(-len(records) // chunk)
    return {"records": len(records), "applies": applies, "cpu_s": cpu, "tables": tables}


def _measure(tree: Path, outputs: Path, workdir: Path, chunk: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    db = workdir / f"replica-{tree.name}.duckdb"
    args = [sys.executable, "-P", __file__, "--run", str(outputs), str(db), str(chunk)]
    done = subprocess.run(args, env=env, cwd=tree, capture_output=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"apply run in {tree} failed:\n{done.stderr.decode()[-3000:]}")
    return orjson.loads(done.stdout.decode().strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=2_000, help="the stages' batches")
    parser.add_argument("--chunks", default="1500", help="records per apply, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="checkout whose store is 'before'")
    parser.add_argument("--workdir", type=Path, default=Path(".tessera/bench-replica"))
    args = parser.parse_args(argv)

    from pipelines.bench import END
    from synthetic.events import write_dataset

    here = Path(__file__).resolve().parent.parent
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    events_file, outputs = workdir / "events.jsonl", workdir / "outputs.jsonl"
    persons = max(10, int(args.events * 0.02))
    write_dataset(events_file, None, persons=persons, events=args.events, seed=7, end=END)
    stages = [sys.executable, "-P", "-m", "pipelines.bench_stages", "--run", str(events_file)]
    stages += [str(args.batch_size), str(workdir / "stages.duckdb"), "", str(outputs)]
    env = {**os.environ, "PYTHONPATH": str(here)}
    subprocess.run(stages, env=env, cwd=here, check=True, stdout=subprocess.DEVNULL)
    trees = ([args.baseline.resolve()] if args.baseline else []) + [here]
    print(f"{args.events:,} events; CPU-s per 10,000 events (each run), load {os.getloadavg()}")
    for chunk in (int(c) for c in args.chunks.split(",")):
        runs: dict[Path, list[dict]] = {tree: [] for tree in trees}
        for _ in range(args.rounds):
            for tree in trees:
                runs[tree].append(_measure(tree, outputs, workdir, chunk))
        per10k = {
            tree: [r["cpu_s"] * 10_000 / args.events for r in results]
            for tree, results in runs.items()
        }
        line = f"chunks of {chunk:,} ({runs[here][0]['records']:,} records): "
        line += "; ".join(
            f"{tree.name} " + ", ".join(f"{s:.3f}" for s in figures)
            for tree, figures in per10k.items()
        )
        if args.baseline:
            before, after = per10k[trees[0]], per10k[here]
            line += f"; ratio of means {sum(after) / sum(before):.2f}x"
            old, new = runs[trees[0]][0]["tables"], runs[here][0]["tables"]
            line += f"; tables differing: {sorted(t for t in old if old[t] != new.get(t))}"
        print(line, flush=True)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--run":
    print(orjson.dumps(_apply_run(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))).decode())
elif __name__ == "__main__":
    main()
