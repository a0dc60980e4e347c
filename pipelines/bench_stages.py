"""Stage hot spots: CPU seconds per 10,000 events of each stage, no Kafka.

`python -m pipelines.bench_stages --events 50000 --batch-size 10000` generates the
synthetic stream (seed 7, the throughput benchmark's events), runs it through
`Pipeline.process` in batches from empty state, and reports the process's CPU time per
10,000 events and each stage's share of it. A stage's time is its own (exclusive): a
stage called inside another is counted once, in the inner one.

`--baseline DIR` runs the same events through the code of another checkout (e.g. the
main branch, `git worktree add DIR main`) in the same run, so the ratio is measured on
the same machine under the same load. `--profile FILE` adds a run under pyinstrument
and writes its text profile (not timed: the profiler's hook slows every Python call);
`--write` replaces this section of BENCHMARKS.md. `--compare-outputs` keeps every output
record of each run and every table of its final state, and reports whether the two
checkouts agree (the wall-clock fields, a dead letter's `rejected_at` and a quality
report's `checked_at` and `gx_seconds`, left out).

`--warm-persons N` first fills each run's state with the events of N persons (two per
person on average: the cost curve's generator, seed 8, so none of them is a timed event),
untimed, in batches of `--batch-size`; the table then shows what each batch costs with
that store behind it. A filled state is cached in `--warm-cache` per (size, digest of the
checkout's source files), built by that checkout's own code, and each run starts from a
copy of it, so a rerun of unchanged code skips the fill (~10+ minutes at 300k persons).

Each run is its own process (the code under test is chosen by PYTHONPATH), and the
first batch, which warms caches and imports, is timed like the others. Once its pipeline
is built, a run sets the garbage collector as the worker does once set up (`tune_collector`
in pipelines/faust_engine.py), so the collections it counts are the ones the worker pays,
and builds the consumed records before the clock, as a worker's event loop builds them.
A checkpoint after the last batch is timed too: a worker pays one per `CHECKPOINT_WAL` of
WAL for what its batches wrote, and a run of a few batches leaves the last of them unpaid
(a checkpoint reached mid-run counts in the commit that triggered it).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

HEADING = "## Stage hot spots"
# (label, owner, attribute): owner is a module path (a function the pipeline imported) or
# an attribute path from the Pipeline instance. Missing ones are skipped, so an older
# checkout that lacks a name is still measured.
SPANS: list[tuple[str, str, str]] = [
    ("contract checks", "module:pipelines.pipeline", "check_contract"),
    ("dedup + classify", "self", "_classify"),
    ("quality suites (GX)", "self", "_check_quality"),
    ("consent gate", "self.gate", "decide"),
    ("consent re-scope query", "self.builder", "persons_holding"),
    ("identity records", "module:pipelines.pipeline", "record_from_event"),
    ("identity records", "module:pipelines.pipeline", "identity_record"),
    ("identity resolve", "self.identity", "resolve"),
    ("profile facts (add)", "self.builder", "add"),
    ("profile facts: accumulators", "self.builder", "_accumulate"),
    ("profile facts: inserts", "self.builder", "_insert"),
    ("profile rebuild", "self", "_rebuild"),
    ("profile rebuild: trait rollup", "module:profiles.builder", "rollup"),
    ("profile rebuild: allowed groups", "self.builder", "_allowed_groups"),
    ("segments", "self.segments", "update"),
    ("lineage entries", "self", "_lineage_entry"),
    ("lineage chain (ledger)", "self.ledger", "append"),
    ("outcomes table", "self", "_record_outcomes"),
    ("output records", "self", "_outputs"),
    ("profile re-pointing (merges, splits)", "self.builder", "repoint"),
    ("profile re-pointing (merges, splits)", "self.builder", "reassign"),
    ("state commit", "self", "_commit"),
    ("batch journal + offsets", "self", "_journal"),
    ("batch journal + offsets", "self", "_record_offsets"),
    ("erasures + identity threshold", "self.privacy", "erase"),
    ("erasures + identity threshold", "self.identity", "apply_threshold"),
]

# Timed once, after the last batch (run_stages).
CHECKPOINT_LABEL = "state checkpoint (the batches' share)"
# The timers' own cost (SpanClock.calibrate), out of the lines they would inflate.
TIMERS_LABEL = "bench timers (per timed call)"


class SpanClock:
    """Exclusive CPU time per span: a span's time minus the spans it called.

    Each timed call reads the process's CPU clock twice (a system call, ~1 us here), and
    spans such as the contract checks are called once per event: ~2.7 us a call, which
    would otherwise land in the caller's line ("dedup + classify", "other"). The cost is
    measured once (`calibrate`) and reported on a line of its own, `TIMERS_LABEL`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[float]] = []
        # What one timed call adds to its own span and to its caller (`calibrate`).
        self._inner = self._outer = 0.0

    def wrap(self, label: str, func: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            frame = [time.process_time(), 0.0]  # start, children's time
            self._stack.append(frame)
            try:
                return func(*args, **kwargs)
            finally:
                self._stack.pop()
                spent = time.process_time() - frame[0]
                self.seconds[label] += spent - frame[1] - self._inner
                self.seconds[TIMERS_LABEL] += self._inner + self._outer
                self.calls[label] += 1
                if self._stack:
                    self._stack[-1][1] += spent + self._outer

        return timed

    def calibrate(self, calls: int = 20_000, rounds: int = 5) -> None:
        """Measure what a timed call of a no-op costs its span and its caller (the least
        of a few rounds: the machine is shared), then start from zero."""
        inner_label, outer_label = "_calibration_inner", "_calibration_outer"
        # With an argument, as the spans are called (the wrapper passes *args on).
        noop = self.wrap(inner_label, lambda _item: None)
        plain = lambda _item: None  # noqa: E731 - the same call, untimed

        def loop(func: Callable[[Any], None]) -> None:
            for item in range(calls):
                func(item)

        timed_loop = self.wrap(outer_label, loop)
        inner = outer = float("inf")
        for _ in range(rounds):
            self.seconds.clear()
            began = time.process_time()
            loop(plain)
            bare = time.process_time() - began
            timed_loop(noop)
            inner = min(inner, self.seconds[inner_label] / calls)
            outer = min(outer, max(0.0, self.seconds[outer_label] - bare) / calls)
        self._inner, self._outer = inner, outer
        self.seconds.clear()
        self.calls.clear()


def _instrument(pipeline: Any, clock: SpanClock) -> None:
    import importlib

    for label, owner, name in SPANS:
        if owner.startswith("module:"):
            target: Any = importlib.import_module(owner.removeprefix("module:"))
        else:
            target = pipeline
            for part in owner.split(".")[1:]:
                target = getattr(target, part, None)
        func = getattr(target, name, None) if target is not None else None
        if func is not None:
            setattr(target, name, clock.wrap(label, func))


# Output fields that read the wall clock: they differ between any two runs.
CLOCK_HEADERS = frozenset({"tessera.rejected_at"})
CLOCK_FIELDS = ("checked_at", "gx_seconds")


def output_lines(outputs: list[Any]) -> list[bytes]:
    """Output records as comparable JSON lines, wall-clock fields left out."""
    from pipelines.topics import QUALITY_REPORTS

    lines = []
    for out in outputs:
        value = out.value
        if out.topic == QUALITY_REPORTS and value is not None:
            doc = orjson.loads(value)
            value = orjson.dumps({k: v for k, v in doc.items() if k not in CLOCK_FIELDS})
        record = {
            "topic": out.topic,
            "key": None if out.key is None else out.key.decode("utf-8", "backslashreplace"),
            "value": None if value is None else value.decode("utf-8", "backslashreplace"),
            "headers": [
                [name, data.decode("utf-8", "backslashreplace")]
                for name, data in out.headers
                if name not in CLOCK_HEADERS
            ],
        }
        lines.append(orjson.dumps(record))
    return lines


def table_digests(conn: Any) -> dict[str, str]:
    """Each table of a state database: its row count and an order-free digest of its rows
    (the sum of their hashes: no whole-table string, so a warm store of millions of rows
    digests in seconds).

    The database file's own tables and views only: a connection's temporary tables and
    registered Arrow tables are scratch space, not state."""
    digests = {}
    for (name,) in conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' "
        "AND table_catalog = current_database() ORDER BY 1"
    ).fetchall():
        count, digest = conn.execute(
            f'SELECT count(*), coalesce(sum(hash(t::VARCHAR)::HUGEINT), 0) FROM "{name}" t'
        ).fetchone()
        digests[name] = f"{count}:{digest}"
    return digests


def compare_outputs(after: dict, before: dict) -> str:
    """One line saying whether two runs' output records and state tables are equal."""
    old = Path(before["outputs_file"]).read_bytes().splitlines()
    new = Path(after["outputs_file"]).read_bytes().splitlines()
    if old == new:
        records = f"all {len(new):,} output records equal"
    else:
        first = next(
            (i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b),
            min(len(old), len(new)),
        )
        differing = sum(a != b for a, b in zip(old, new, strict=False)) + abs(len(old) - len(new))
        topic = orjson.loads((new + old)[first if first < len(new) else len(new)])["topic"]
        records = (
            f"output records DIFFER: {differing:,} of {len(new):,} (before {len(old):,}), "
            f"first at #{first} on {topic}"
        )
    tables = after["tables"]
    unequal = sorted(
        n for n in {*tables, *before["tables"]} if tables.get(n) != before["tables"].get(n)
    )
    state = (
        f"all {len(tables)} state tables equal"
        if not unequal
        else "state tables differing: " + ", ".join(unequal)
    )
    return (
        f"- {records} (wall-clock fields left out: {', '.join(sorted(CLOCK_HEADERS))}, "
        f"{', '.join(CLOCK_FIELDS)}); {state}"
    )


WARM_SEED = 8
# The source a state depends on: the benchmarks' own modules are left out, so changing
# them keeps a cached warm state.
SOURCE_DIRS = ("consent", "identity", "pipelines", "profiles", "quality", "schemas", "synthetic")


def source_digest(tree: Path) -> str:
    """A digest of the checkout's source files (Python, YAML, JSON), benchmarks excluded."""
    digest = hashlib.blake2b(digest_size=8)
    for folder in SOURCE_DIRS:
        for path in sorted((tree / folder).rglob("*")):
            if path.suffix not in (".py", ".yaml", ".yml", ".json") or not path.is_file():
                continue
            if path.parent.name == "pipelines" and path.name.startswith("bench"):
                continue
            digest.update(str(path.relative_to(tree)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _reset_peak_rss() -> None:
    """Start this process's peak resident memory (VmHWM) afresh from what it holds now
    (Linux; elsewhere a no-op), so the peak read later is the timed part's alone."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mb() -> float:
    """This process's peak resident memory since the last reset, in MiB (0 without /proc).
    Not shared with bench_worker's: a run imports the measured checkout's modules, which
    may predate it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def warm_state(warm_events: Path, batch_size: int, cached: Path) -> int:
    """Fill `cached` (unless it exists) with this code's state after `warm_events`, fed in
    batches of `batch_size`; returns the number of warm events (the timed ones follow)."""
    from pipelines.bench import feed
    from pipelines.pipeline import Pipeline
    from pipelines.produce import read_lines

    lines = list(read_lines(warm_events))
    if cached.exists():
        return len(lines)
    partial = cached.with_name(cached.name + ".partial")
    for stale in (partial, partial.with_name(partial.name + ".wal")):
        stale.unlink(missing_ok=True)
    pipeline = Pipeline(partial)
    feed(pipeline, lines, batch_size)
    pipeline.close()  # checkpoints: the file alone holds the state
    partial.rename(cached)
    return len(lines)


def _worker_collector() -> Callable[[], None]:
    """Set the garbage collector as the worker runs it (`tune_collector` in
    pipelines/faust_engine.py); returns what puts Python's settings back. With Python's
    default (a young collection every 700 net allocations) a run paid collections the worker
    does not: a young one over what every batch keeps, a middle one about every batch, full
    passes over the unfrozen heap, and the full one the identity index takes when it loads,
    over everything the process had imported (~170 ms, 0.085 CPU s per 10k events in the
    identity line at 20,000 events). A checkout without `tune_collector` keeps the default."""
    try:
        from pipelines.faust_engine import tune_collector
    except ImportError:
        return lambda: None
    threshold = gc.get_threshold()
    tune_collector()

    def restore() -> None:
        gc.unfreeze()
        gc.set_threshold(*threshold)

    return restore


def _feed_records(pipeline: Any, records: list[Any], batch_size: int) -> float:
    """`pipelines.bench.feed` over records built beforehand (here, so that a baseline's
    checkout is fed the same way); returns seconds."""
    started = time.perf_counter()
    for start in range(0, len(records), batch_size):
        pipeline.process(records[start : start + batch_size], lambda _outputs: None)
    return time.perf_counter() - started


def run_stages(
    events_file: Path,
    batch_size: int,
    state: Path,
    profile: Path | None,
    outputs_file: Path | None = None,
    warm: tuple[Path, Path] | None = None,
) -> dict:
    """One measured run of this interpreter's code over `events_file`; returns its figures.

    With `outputs_file`, the run also writes its output records there (`output_lines`)
    and returns a digest of every table of its final state. With `warm` (events file,
    cached state file), the run starts from a copy of the state those events leave
    (`warm_state`), its events take the offsets after them, and what a restart loads once
    is loaded before the clock."""
    from pipelines.pipeline import Pipeline, SourceRecord
    from pipelines.produce import read_lines
    from pipelines.topics import route

    lines = list(read_lines(events_file))
    for stale in (state, state.with_name(state.name + ".wal")):
        stale.unlink(missing_ok=True)
    first = 0
    if warm is not None:
        first = warm_state(warm[0], batch_size, warm[1])
        shutil.copyfile(warm[1], state)
    pipeline = Pipeline(state)  # quality suites on, built before the clock starts
    if warm is not None:
        # What a restarted worker loads once, on its first batch (the in-memory identity
        # index, the stored event keys' hashes): loaded before the clock, so the figures
        # are the per-batch cost.
        getattr(pipeline.identity, "index", None)
        if getattr(pipeline, "stored_keys", None) is not None:
            pipeline.stored_keys.holds("")
        if getattr(pipeline.gate, "_stored", None) is not None:  # the consent gate's values
            pipeline.gate._stored.holds("")
    # The consumed records, built before the clock: in a worker the event loop builds them
    # as events arrive, not the stage thread (routing parses each event, ~2.6 us).
    records = [SourceRecord(route(raw)[0], 0, first + i, raw) for i, raw in enumerate(lines)]
    # The collector as a set-up worker has it: what exists frozen, young collections every
    # 100,000 net allocations (restored when the run ends).
    restore_collector = _worker_collector()
    outcomes_sql = "SELECT outcome, count(*) FROM outcomes GROUP BY 1"
    warm_outcomes = Counter(dict(pipeline.conn.execute(outcomes_sql).fetchall()))
    clock = SpanClock()
    clock.calibrate()
    _instrument(pipeline, clock)
    kept: list[Any] = []
    if outputs_file is not None:
        process = pipeline.process

        def keeping(batch: Any, emit: Callable[[list[Any]], None], consumed: Any = ()) -> Any:
            return process(batch, lambda outputs: (kept.extend(outputs), emit(outputs)), consumed)

        pipeline.process = keeping
    profiler = None
    if profile is not None:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.002)
        profiler.start()
    _reset_peak_rss()
    rss_start = _peak_rss_mb()
    cpu0 = time.process_time()
    wall = _feed_records(pipeline, records, batch_size)
    # The batches' share of checkpoints: DuckDB writes a batch's rows into the database
    # file (compressed) at the first checkpoint after its commit, once per CHECKPOINT_WAL
    # of WAL; the last batches' would otherwise fall to the close, untimed.
    began = time.process_time()
    pipeline.conn.execute("CHECKPOINT")
    clock.seconds[CHECKPOINT_LABEL] += time.process_time() - began
    cpu = time.process_time() - cpu0
    peak_rss = _peak_rss_mb()
    if profiler is not None:
        profiler.stop()
        profile.write_text(profiler.output_text(unicode=False, color=False, show_all=False))
    # The timed events' outcomes alone.
    outcomes = dict(Counter(dict(pipeline.conn.execute(outcomes_sql).fetchall())) - warm_outcomes)
    figures = {
        "warm_events": first,
        "events": len(lines),
        "cpu_s": cpu,
        "wall_s": wall,
        "spans": dict(clock.seconds),
        "outcomes": outcomes,
        "rss_start_mb": rss_start,
        "peak_rss_mb": peak_rss,
    }
    if outputs_file is not None:
        outputs_file.write_bytes(b"".join(line + b"\n" for line in output_lines(kept)))
        figures["outputs_file"] = str(outputs_file)
        figures["tables"] = table_digests(pipeline.conn)
    pipeline.close()
    restore_collector()
    return figures


def _measure(
    tree: Path,
    events_file: Path,
    batch_size: int,
    workdir: Path,
    profile: Path | None,
    outputs: bool = False,
    warm: tuple[Path, Path, int] | None = None,
    warm_tree: Path | None = None,
):
    """Run the stages of the checkout at `tree` in a process of their own; `warm` is
    (warm events file, cache folder, persons), filled by the code of `warm_tree` (default
    `tree`)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    args = [sys.executable, "-P", __file__, "--run", str(events_file), str(batch_size)]
    args += [str(workdir / f"state-{tree.name}.duckdb"), str(profile or "")]
    args.append(str(workdir / f"outputs-{tree.name}.jsonl") if outputs else "")
    if warm is not None:
        warm_events, cache, persons = warm
        digest = source_digest(warm_tree or tree)
        cached = cache / f"warm-{persons}-b{batch_size}-{digest}.duckdb"
        args += [str(warm_events), str(cached)]
    done = subprocess.run(args, env=env, cwd=tree, capture_output=True, timeout=6 * 3600)
    if done.returncode != 0:
        raise RuntimeError(f"stage run in {tree} failed:\n{done.stderr.decode()[-3000:]}")
    return orjson.loads(done.stdout.decode().strip().splitlines()[-1])


def _start(result: dict) -> str:
    warm = result.get("warm_events", 0)
    if not warm:
        return "empty state"
    filled = "by the baseline's code" if result.get("warm_from_baseline") else "by each run's code"
    return (
        f"state first filled (untimed, {filled}) with {warm:,} events of "
        f"{result['warm_persons']:,} persons (seed {WARM_SEED})"
    )


def report(
    after: dict, before: dict | None, command: str, batch_size: int, outputs: str | None = None
) -> str:
    """The BENCHMARKS.md section of one run."""
    from pipelines.bench import machine

    def per10k(result: dict, seconds: float) -> float:
        return seconds / result["events"] * 10_000

    lines = [
        HEADING,
        "",
        f"- machine: {machine()} (shared with other work while it ran)",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- command: `{command}`",
        f"- {after['events']:,} synthetic events (seed 7), batches of {batch_size:,}, quality "
        f"suites on, {_start(after)}, no Kafka; CPU seconds of the process (`time.process_time`)",
        "",
        "| figure | before | after | after / before |",
        "|---|---:|---:|---:|",
    ]
    b = before or {}

    def row(name: str, old: float | None, new: float, digits: int = 3) -> str:
        ratio = f"{new / old:.2f}" if old else ""
        shown = f"{old:.{digits}f}" if old is not None else ""
        return f"| {name} | {shown} | {new:.{digits}f} | {ratio} |"

    lines.append(
        row(
            "CPU s per 10k events, all stages",
            per10k(b, b["cpu_s"]) if b else None,
            per10k(after, after["cpu_s"]),
        )
    )
    lines.append(
        row(
            "events per CPU-second",
            b["events"] / b["cpu_s"] if b else None,
            after["events"] / after["cpu_s"],
            0,
        )
    )
    if "peak_rss_mb" in after:
        lines.append(
            row("RSS at the first batch, MiB", b.get("rss_start_mb"), after["rss_start_mb"], 0)
        )
        lines.append(
            row("peak RSS over the batches, MiB", b.get("peak_rss_mb"), after["peak_rss_mb"], 0)
        )
    lines += ["", "| stage (exclusive CPU) | before s/10k | share | after s/10k | share |"]
    lines.append("|---|---:|---:|---:|---:|")
    labels = [
        *dict.fromkeys(label for label, _, _ in SPANS),
        CHECKPOINT_LABEL,
        TIMERS_LABEL,
        "other (plumbing)",
    ]

    def spans(result: dict) -> dict[str, float]:
        measured = dict(result["spans"])
        measured[labels[-1]] = result["cpu_s"] - sum(measured.values())
        return measured

    old, new = (spans(b) if b else {}), spans(after)
    order = sorted(labels, key=lambda label: -old.get(label, new.get(label, 0.0)))

    def cell(label: str, result: dict, measured: dict) -> str:
        if label not in measured:
            return " | "
        seconds = measured[label]
        return f"{per10k(result, seconds):.3f} | {seconds / result['cpu_s']:.0%}"

    for label in order:
        lines.append(f"| {label} | {cell(label, b, old)} | {cell(label, after, new)} |")
    same = b.get("outcomes") == after["outcomes"] if b else None
    lines += [
        "",
        f"- outcomes after: {after['outcomes']}"
        + (f"; equal to before: {same}" if same is not None else ""),
    ]
    if outputs:
        lines.append(outputs)
    return "\n".join(lines) + "\n"


def replace_section(path: Path, section: str) -> None:
    """Put `section` in BENCHMARKS.md in place of its former self (or at the end)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    parts = text.split("\n## ")
    kept = [parts[0].rstrip()] + ["## " + p.rstrip() for p in parts[1:]]
    for index, part in enumerate(kept):
        if part.split("\n", 1)[0] == HEADING:
            kept[index] = section.rstrip()
            break
    else:
        kept.append(section.rstrip())
    path.write_text("\n\n".join(kept) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--baseline", type=Path, help="checkout whose stages are 'before'")
    parser.add_argument("--profile", type=Path, help="pyinstrument text profile of this run")
    parser.add_argument("--workdir", type=Path, default=Path(".tessera/bench-stages"))
    parser.add_argument("--write", action="store_true", help="replace the BENCHMARKS.md section")
    parser.add_argument(
        "--warm-persons",
        type=int,
        default=0,
        help="fill the state with this many persons' events (untimed) before the timed events",
    )
    parser.add_argument(
        "--warm-cache",
        type=Path,
        default=Path(".tessera/bench-stages/warm"),
        help="folder of filled states, one per (persons, batch size, source digest)",
    )
    parser.add_argument(
        "--warm-from-baseline",
        action="store_true",
        help="both runs start from the state the baseline's code filled (for changes that "
        "keep the state's layout: saves the second fill)",
    )
    parser.add_argument(
        "--compare-outputs",
        action="store_true",
        help="with --baseline: compare every output record and state table of the two runs",
    )
    args = parser.parse_args(argv)

    from pipelines.bench import END
    from synthetic.events import write_dataset

    args.workdir.mkdir(parents=True, exist_ok=True)
    events_file = (args.workdir / "events.jsonl").resolve()
    persons = max(10, int(args.events * 0.02))
    write_dataset(events_file, None, persons=persons, events=args.events, seed=7, end=END)
    here = Path(__file__).resolve().parent.parent
    workdir = args.workdir.resolve()
    warm = None
    if args.warm_persons > 0:
        args.warm_cache.mkdir(parents=True, exist_ok=True)
        # Generated once per size, beside the states it fills (minutes at 300k persons).
        warm_events = args.warm_cache.resolve() / f"events-{args.warm_persons}.jsonl"
        if not warm_events.exists():
            n, partial = args.warm_persons, warm_events.with_suffix(".partial")
            write_dataset(partial, None, persons=n, events=2 * n, seed=WARM_SEED, end=END)
            partial.rename(warm_events)
        warm = (warm_events, args.warm_cache.resolve(), args.warm_persons)
    before = None
    keep = args.compare_outputs and args.baseline is not None
    if args.baseline is not None:
        before = _measure(
            args.baseline.resolve(), events_file, args.batch_size, workdir, None, keep, warm
        )
    filler = args.baseline.resolve() if args.warm_from_baseline and args.baseline else None
    after = _measure(here, events_file, args.batch_size, workdir, None, keep, warm, filler)
    if args.profile is not None:
        # A run of its own: the profiler's hook on every call would inflate the figures.
        profile = args.profile.resolve()
        _measure(here, events_file, args.batch_size, workdir, profile, False, warm, filler)
    for result in (before, after):
        if result is not None:
            result["warm_persons"] = args.warm_persons
            result["warm_from_baseline"] = filler is not None
    command = "python -m pipelines.bench_stages " + " ".join(
        a if not a.startswith("/") else Path(a).name for a in (argv or sys.argv[1:])
    )
    outputs = compare_outputs(after, before) if keep and before is not None else None
    section = report(after, before, command, args.batch_size, outputs)
    print(section)
    if args.write:
        replace_section(here / "BENCHMARKS.md", section)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--run":
    _events, _batch, _state, _profile, _outputs = sys.argv[2:7]
    figures = run_stages(
        Path(_events),
        int(_batch),
        Path(_state),
        Path(_profile) if _profile else None,
        Path(_outputs) if _outputs else None,
        (Path(sys.argv[7]), Path(sys.argv[8])) if len(sys.argv) > 8 else None,
    )
    print(orjson.dumps(figures).decode(), flush=True)
elif __name__ == "__main__":
    main()
