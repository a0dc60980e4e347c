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

`--prefill-persons N` starts each store with N other persons (see `_prefill`), so the
applies meet the table sizes of a long-running replica.

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
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from profiles.store import ProfileStore


def _prefill(store: ProfileStore, persons: int) -> None:
    """`persons` other persons in the store before the clock, as a long-running replica
    holds: a document, three identifiers and three identity records each (ids no
    synthetic event uses), checkpointed, so an apply's scans meet a store of that size."""
    if not persons:
        return
    from profiles.store import _pack

    doc = _pack(orjson.dumps({"person_id": "x", "version": 1, "identifiers": {}, "views": {}}))
    # Ids shaped as the stages' (hex after the same prefixes), so they interleave with the
    # applied ones in every key order and no min/max filter skips them.
    person = "'p_' || md5('bulk-' || i)[:16]"
    cur = store.conn.cursor()
    cur.execute(
        f"INSERT INTO profile_documents SELECT {person}, ?, 1 FROM range(?) r(i)",
        [doc, persons],
    )
    cur.execute(
        f"""INSERT INTO profile_identifiers SELECT t, p || md5(t || i), {person}
            FROM range(?) r(i),
                 (VALUES ('anonymous_id', 'anon-'), ('email', ''), ('user_id', 'u-')) k(t, p)""",
        [persons],
    )
    cur.execute(
        f"""INSERT INTO identity_membership SELECT 'r_' || md5('bulk-' || i || '-' || j)[:24],
                   {person}
            FROM range(?) r(i), range(3) s(j)""",
        [persons],
    )
    cur.execute("CHECKPOINT")


def _apply_run(outputs: Path, db: Path, chunk: int, prefill: int = 0) -> dict:
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
    _prefill(store, prefill)
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


def _measure(tree: Path, outputs: Path, workdir: Path, chunk: int, prefill: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    db = workdir / f"replica-{tree.name}.duckdb"
    args = [sys.executable, "-P", __file__, "--run", str(outputs), str(db), str(chunk)]
    args.append(str(prefill))
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
    parser.add_argument(
        "--prefill-persons",
        type=int,
        default=0,
        help="other persons in the store before the applies (a larger store's scans)",
    )
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
    print(
        f"{args.events:,} events, {args.prefill_persons:,} persons before; CPU-s per 10,000 "
        f"events (each run), load {os.getloadavg()}"
    )
    for chunk in (int(c) for c in args.chunks.split(",")):
        runs: dict[Path, list[dict]] = {tree: [] for tree in trees}
        for _ in range(args.rounds):
            for tree in trees:
                runs[tree].append(_measure(tree, outputs, workdir, chunk, args.prefill_persons))
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
    run = _apply_run(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    print(orjson.dumps(run).decode())
elif __name__ == "__main__":
    main()
