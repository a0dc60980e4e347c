"""Benchmarks of a running stack: freshness, backpressure and a kill -9 soak.

- freshness: events produced at a steady rate through broker, worker and API; probe
  events among them, and the time from producing each probe to the API serving it, split
  into hops from the output topics (`probe_hops`). `python -m pipelines.bench_live
  --rates 1000,2000 --baseline DIR` runs it for this checkout and, alternately in the same
  run, for another checkout's worker and API;
- backpressure: a worker whose profile store is made slow while events keep arriving:
  its memory must stay flat while the backlog grows, and no event may be lost;
- soak: the same events through a fault-free stack and through one whose worker is
  killed with SIGKILL again and again; the final state must be the same.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import shutil
import signal
import statistics
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import httpx
import orjson

from pipelines import topics
from pipelines.broker import EmbeddedBroker
from pipelines.demo import wait_until_processed
from pipelines.kafka import BatchProducer, topic_messages
from pipelines.pipeline import OutRecord
from pipelines.stack import LocalStack
from pipelines.topics import route
from profiles.access import KEYS_ENV, write_keyring

PROBE_PREFIX = "freshness-probe-"
_PROBE_ID = re.compile(rb'"' + PROBE_PREFIX.encode() + rb'(\d+)"')


def probe_event(number: int) -> bytes:
    """An identify event of a new person known only by a unique user id, stamped now."""
    return orjson.dumps(
        {
            "type": "identify",
            "userId": f"{PROBE_PREFIX}{number}",
            "traits": {"plan": "probe"},
            "context": {"location": {"country": "US"}},
            "messageId": str(uuid.uuid4()),
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by the inclusive method; NaN for no values."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


class SteadyProducer(threading.Thread):
    """Produces `lines` at `rate` events/s in ticks of 50 ms, a probe every `probe_every` s.

    `sent_at` maps each probe number to the time it was handed to the producer.
    """

    def __init__(
        self, bootstrap: str, lines: Sequence[bytes], rate: float, probe_every: float = 0.0
    ) -> None:
        super().__init__(name="steady-producer", daemon=True)
        self.producer = BatchProducer(bootstrap, **{"linger.ms": 1})
        self.lines, self.rate, self.probe_every = lines, rate, probe_every
        self.sent = 0
        self.timeline: list[tuple[float, int]] = []  # (unix time, events produced so far)
        self.sent_at: dict[int, float] = {}
        self.probes = 0
        self.error: BaseException | None = None
        self.cpu = 0.0  # this thread's CPU-seconds, once it has run

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # surfaced by the caller, never swallowed
            self.error = exc
        finally:
            self.cpu = time.thread_time()

    def _run(self) -> None:
        tick = 0.05
        start = time.monotonic()
        next_probe = start
        while self.sent < len(self.lines):
            due = min(len(self.lines), int((time.monotonic() - start + tick) * self.rate))
            chunk = [OutRecord(*route(raw), raw) for raw in self.lines[self.sent : due]]
            now = time.monotonic()
            if self.probe_every and now >= next_probe:
                self.probes += 1
                raw = probe_event(self.probes)
                self.sent_at[self.probes] = time.time()
                chunk.append(OutRecord(*route(raw), raw))
                next_probe = now + self.probe_every
            if chunk:
                self.producer.send(chunk)
            self.sent = max(self.sent, due)
            self.timeline.append((time.time(), self.sent + self.probes))
            time.sleep(max(0.0, start + (len(self.timeline)) * tick - time.monotonic()))
        self.producer.close()


class ProbeWatcher(threading.Thread):
    """Polls the API for the oldest probe not served yet until it is, then for the next;
    records when each was first served.

    Probes are produced in order to one partition and batches run in order, so a probe is
    never served before the ones produced earlier: asking for the oldest one alone every
    20 ms (and for the next at once when it is there) adds no request per probe waiting,
    which under load would add its own delay to every latency. A probe served out of
    order would be recorded later than it was served: an overestimate, never an under-.
    """

    def __init__(self, api_url: str, api_key: str, producer: SteadyProducer) -> None:
        super().__init__(name="probe-watcher", daemon=True)
        self.api_url, self.api_key, self.producer = api_url, api_key, producer
        self.seen_at: dict[int, float] = {}
        self.stop = threading.Event()
        self.cpu = 0.0  # this thread's CPU-seconds, once it has stopped

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.cpu = time.thread_time()

    def _run(self) -> None:
        headers = {"X-API-Key": self.api_key}
        with httpx.Client(base_url=self.api_url, timeout=5, headers=headers) as http:
            number = 1
            while not self.stop.is_set():
                if number in self.producer.sent_at:
                    response = http.get(
                        "/v1/profiles/lookup",
                        params={
                            "type": "user_id",
                            "value": f"{PROBE_PREFIX}{number}",
                            "purpose": "subject_access",
                        },
                    )
                    if response.status_code == 200:
                        self.seen_at[number] = time.time()
                        number += 1
                        continue  # the next one may have come with it
                time.sleep(0.02)


def _admin_key(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    keys = write_keyring(folder / "api-keys.yaml", [{"name": "bench", "role": "admin"}])
    os.environ[KEYS_ENV] = str(folder / "api-keys.yaml")  # read by the API process
    return keys["bench"]


def _wait_until_serving(stack: LocalStack, key: str, timeout: float = 300) -> None:
    """Wait until the worker has joined and a first event is served: start-up excluded."""
    producer = BatchProducer(stack.bootstrap)
    raw = probe_event(0)
    producer.send([OutRecord(*route(raw), raw)])
    producer.close()
    deadline = time.monotonic() + timeout
    params = {"type": "user_id", "value": f"{PROBE_PREFIX}0", "purpose": "subject_access"}
    while True:
        response = httpx.get(
            f"{stack.api_url}/v1/profiles/lookup",
            params=params,
            headers={"X-API-Key": key},
            timeout=5,
        )
        if response.status_code == 200:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the stack served no event within {timeout} s")
        time.sleep(0.2)


def probe_hops(bootstrap: str, sent_at: dict[int, float]) -> dict[int, dict[str, float]]:
    """Where each probe's time went, from the records on the output topics.

    Per probe: `to_stages`, from producing it to the quality check of the batch it was
    processed in (the report's `checked_at`, taken as the batch's stages begin: broker,
    worker fetch, and waiting for that batch to be cut and for the batch before it);
    `stages`, from there to its profile's first changelog record (stamped when the
    worker produced its outputs); and `batch`, that batch's event count. The rest, up to
    the API serving it, is the replica's fetch and apply and the watcher's poll.
    """
    emitted: dict[int, float] = {}
    for message in topic_messages(bootstrap, topics.PROFILES_CHANGELOG):
        for found in _PROBE_ID.findall(message.value() or b""):
            number = int(found)
            if number in sent_at and number not in emitted:
                emitted[number] = message.timestamp()[1] / 1000
    reports = sorted(
        (message.timestamp()[1] / 1000, orjson.loads(message.value()))
        for message in topic_messages(bootstrap, topics.QUALITY_REPORTS)
        if message.value()
    )
    hops: dict[int, dict[str, float]] = {}
    for number, at in emitted.items():
        # The batch's report is produced with its changelog records, just after them.
        index = next((i for i, (stamp, _) in enumerate(reports) if stamp >= at - 0.002), None)
        if index is None or not reports[index][1].get("checked_at"):
            continue
        report = reports[index][1]
        began = datetime.fromisoformat(report["checked_at"]).timestamp()
        hops[number] = {
            "to_stages": began - sent_at[number],
            "stages": at - began,
            "emitted": at - sent_at[number],
            "batch": report["events"],
            # From the batch before producing its outputs to this batch's check.
            "gap": began - reports[index - 1][0] if index else float("nan"),
        }
    return hops


def batch_gaps(bootstrap: str) -> list[float]:
    """Per batch after the first, the wall seconds from the batch before producing its
    outputs (its quality report's stamp) to this batch's quality check (`checked_at`):
    the outputs' acknowledgement and the state commit, handing the batch back, cutting and
    handing over the next, and its contract check."""
    batches = sorted(
        (message.timestamp()[1] / 1000, orjson.loads(message.value()).get("checked_at"))
        for message in topic_messages(bootstrap, topics.QUALITY_REPORTS)
        if message.value()
    )
    return [
        datetime.fromisoformat(checked).timestamp() - stamp
        for (stamp, _), (_, checked) in itertools.pairwise(batches)
        if checked
    ]


_TICKS = os.sysconf("SC_CLK_TCK")


def stat_cpu(path: str) -> float:
    """CPU-seconds (user + system) of a process or thread from its /proc stat file; 0 if gone."""
    try:
        with open(path, "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _machine_busy() -> float:
    """CPU-seconds all cores spent not idle since boot (every process, ours or not)."""
    with open("/proc/stat", "rb") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = values[:7]
    return (user + nice + system + irq + softirq) / _TICKS  # not steal: not ours to use


class CpuMeter:
    """CPU-seconds each process of the stack and the bench process spend in a window.

    Processes are read from /proc (`pid/stat`); `bench` is the whole bench process (its
    producer and watcher threads time themselves), `bench librdkafka` the threads of its
    producer's client (`rdk:*`); `machine`, every process on the machine, ours or not.
    """

    def __init__(self, processes: dict[str, int]) -> None:
        self.processes = processes
        self.start = self._sample()

    def _sample(self) -> dict[str, float]:
        sample = {name: stat_cpu(f"/proc/{pid}/stat") for name, pid in self.processes.items()}
        sample["bench"] = stat_cpu("/proc/self/stat")
        sample["bench librdkafka"] = sum(
            stat_cpu(f"/proc/self/task/{tid}/stat")
            for tid in os.listdir("/proc/self/task")
            if _comm(f"/proc/self/task/{tid}/comm").startswith("rdk:")
        )
        sample["machine"] = _machine_busy()
        sample["wall"] = time.monotonic()
        return sample

    def stop(self) -> dict[str, float]:
        """CPU-seconds per part since the meter was made; `wall`: the window's seconds."""
        end = self._sample()
        return {name: round(end[name] - self.start[name], 2) for name in end}


def _comm(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return ""


def process_threads(pid: int) -> dict[str, tuple[float, float]]:
    """A process's threads ("tid comm"): seconds on a CPU and seconds runnable but waiting
    for one (`schedstat`), for telling the stage thread from the event loop (the main
    thread, tid == pid) and the clients' threads, and a full machine from a busy thread."""
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        name = f"{tid} {_comm(f'/proc/{pid}/task/{tid}/comm')}"
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as handle:
                ran, waited, _ = (int(v) / 1e9 for v in handle.read().split())
        except OSError:
            continue
        threads[name] = (ran, waited)
    return threads


TOPOLOGIES = ("single", "split")


def freshness(
    lines: Sequence[bytes],
    rate: float,
    folder: Path,
    seconds: float,
    topology: str = "single",
) -> dict[str, Any]:
    """Produce `rate` events/s for `seconds` into a fresh stack; probe latency to the API.

    `topology`: `single`, one worker (`--role all`); `split`, one ingest worker
    (`--role ingest`) forwarding to the stage owner (`--role stages`).
    """
    count = min(len(lines), int(rate * seconds))
    key = _admin_key(folder)
    split = topology == "split"
    with LocalStack(folder / "stack", worker_options={"role": "stages"} if split else {}) as stack:
        if split:  # an ingest worker in front of the stack's worker, the stage owner
            stack.start_worker("ingest", role="ingest")
        _wait_until_serving(stack, key)
        producer = SteadyProducer(stack.bootstrap, lines[:count], rate, probe_every=0.2)
        watcher = ProbeWatcher(stack.api_url, key, producer)
        pids = {name: process.pid for name, process in stack.processes.items()}
        assert stack.broker.process is not None
        pids["broker"] = stack.broker.process.pid
        started = time.time()
        producer.start()
        watcher.start()
        meter = CpuMeter(pids)
        threads_before = {name: process_threads(pids[name]) for name in ("worker", "api")}
        producer.join()
        produced_for = time.time() - started
        if producer.error:
            raise producer.error
        deadline = time.monotonic() + 600
        while len(watcher.seen_at) < producer.probes and time.monotonic() < deadline:
            time.sleep(0.1)
        cpu = meter.stop()
        threads_after = {name: process_threads(pids[name]) for name in ("worker", "api")}
        watcher.stop.set()
        watcher.join()
        cpu.update({"bench producer": producer.cpu, "bench watcher": watcher.cpu})
        replica = httpx.get(f"{stack.api_url}/healthz", timeout=10).json().get("replica", {})
        drained_for = time.time() - started
        hops = probe_hops(stack.bootstrap, producer.sent_at)
        gaps = batch_gaps(stack.bootstrap)
    # The six busiest threads of the worker and of the API: [on a CPU, waiting for one], s.
    threads = {}
    for process, after in threads_after.items():
        spent = {}
        for name, (ran, waited) in after.items():
            ran_before, waited_before = threads_before[process].get(name, (0.0, 0.0))
            spent[name] = [round(ran - ran_before, 2), round(waited - waited_before, 2)]
        threads[process] = dict(sorted(spent.items(), key=lambda kv: -kv[1][0])[:6])
    latencies = sorted(
        watcher.seen_at[n] - producer.sent_at[n] for n in watcher.seen_at if n in producer.sent_at
    )
    served = {n: watcher.seen_at[n] - hops[n]["emitted"] - producer.sent_at[n] for n in hops}
    return {
        "rate": rate,
        "topology": topology,
        "achieved_rate": count / produced_for,
        "events": count,
        "probes": producer.probes,
        "seen": len(latencies),
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "max": latencies[-1] if latencies else float("nan"),
        "drain_rate": (count + producer.probes) / drained_for,
        # Medians over the probes: where a probe's time goes (see probe_hops).
        "to_stages_p50": percentile(sorted(h["to_stages"] for h in hops.values()), 50),
        "stages_p50": percentile(sorted(h["stages"] for h in hops.values()), 50),
        "served_p50": percentile(sorted(served.values()), 50),
        "to_stages_p99": percentile(sorted(h["to_stages"] for h in hops.values()), 99),
        "stages_p99": percentile(sorted(h["stages"] for h in hops.values()), 99),
        "served_p99": percentile(sorted(served.values()), 99),
        "batch_p50": percentile(sorted(h["batch"] for h in hops.values()), 50),
        "gap_p50": percentile(sorted(h["gap"] for h in hops.values()), 50),
        # Between batches (see batch_gaps): how many, their median and sum, in seconds.
        "batches": len(gaps) + 1,
        "between_p50": percentile(sorted(gaps), 50),
        "between_total": sum(gaps),
        # CPU-seconds from the first event produced to the last probe served.
        "cpu": cpu,
        "threads": threads,
        "replica_applies": replica.get("applies"),
        "replica_records": replica.get("records_applied"),
        "replica_apply_cpu": replica.get("apply_cpu_seconds"),
    }


def backpressure(
    lines: Sequence[bytes], folder: Path, batch_size: int, rate: float, slow_ms: int, slow_s: float
) -> dict[str, Any]:
    """A worker with a slow store while events keep coming: memory, backlog, losses."""
    from pipelines.bench import faust_run

    result: dict[str, Any] = {}
    shutil.rmtree(folder / "slow", ignore_errors=True)  # a previous run's state replays all
    with EmbeddedBroker() as broker:
        producer = SteadyProducer(broker.bootstrap, lines, rate)
        producer.start()
        run = faust_run(
            broker.bootstrap,
            "pipeline",
            len(lines),
            folder / "slow",
            batch_size,
            slow=(slow_ms, slow_s),
        )
        producer.join()
        if producer.error:
            raise producer.error
    samples = run["samples"]
    start = run["first_at"]
    produced = producer.timeline

    def produced_by(when: float) -> int:
        return max((n for t, n in produced if t <= when), default=0)

    slow_phase = [s for s in samples if 0 <= s[0] - start <= slow_s]
    conn = duckdb.connect(str(folder / "slow" / "state.duckdb"), read_only=True)
    try:
        (consumed,) = conn.execute("SELECT sum(next_offset) FROM source_offsets").fetchone()
        (outcomes,) = conn.execute("SELECT count(*) FROM outcomes").fetchone()
    finally:
        conn.close()
    rss = [s[1] for s in slow_phase] or [0.0]
    lags = [produced_by(t) - n for t, _, n in slow_phase] or [0]
    result.update(
        events=len(lines),
        rate=rate,
        slow_ms=slow_ms,
        slow_seconds=slow_s,
        rss_first=rss[0],
        rss_max=max(rss),
        rss_last=rss[-1],
        lag_first=lags[0],
        lag_max=max(lags),
        lag_last=lags[-1],
        processed_in_slow_phase=slow_phase[-1][2] if slow_phase else 0,
        consumed=consumed,
        outcomes=outcomes,
        max_rss_mb=run["max_rss_mb"],
        input_mb=sum(len(raw) for raw in lines) / 2**20,
    )
    return result


def _state_digest(state: Path) -> dict[str, Any]:
    """What a final state holds, independent of person ids and batch boundaries: every
    event's outcome and reason, and which applied events make up each profile."""
    conn = duckdb.connect(str(state), read_only=True)
    try:
        outcomes = dict(
            (key, (outcome, reason))
            for key, outcome, reason in conn.execute(
                "SELECT event_key, outcome, reason FROM outcomes"
            ).fetchall()
        )
        profiles = {
            tuple(events)
            for (events,) in conn.execute(
                "SELECT list(event_key ORDER BY event_key) FROM facts GROUP BY person_id"
            ).fetchall()
        }
        facts = conn.execute(
            "SELECT event_key, kind, ts, order_id, amount, currency FROM facts ORDER BY event_key"
        ).fetchall()
    finally:
        conn.close()
    return {"outcomes": outcomes, "profiles": profiles, "facts": facts}


def _outcome_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """The API's counts that must not change under faults. Identity-log counts may: a batch
    killed after its outputs but before its commit logs its links again when replayed."""
    return {k: v for k, v in stats.items() if not k.startswith(("merges", "identity_"))}


def _received(stack: LocalStack) -> int:
    return httpx.get(f"{stack.api_url}/v1/stats", timeout=10).json()["received"]


def _stack_run(
    lines: Sequence[bytes], folder: Path, expected: int, kill_every: tuple[float, float] | None
) -> tuple[dict[str, Any], int, dict[str, Any]]:
    """Produce `lines` into a fresh stack, optionally SIGKILL the worker at random intervals
    until every event has an outcome; returns the state digest, kills and API stats."""
    from pipelines.produce import produce_events

    kills = 0
    rng = random.Random(11)
    with LocalStack(folder) as stack:
        produce_events(lines, stack.bootstrap)
        if kill_every is not None:
            done = 0
            while done < expected:
                # Each life of the worker makes some progress (a restart costs a group join),
                # then dies at a random moment: consuming, staging or emitting.
                since = done
                while (done := _received(stack)) <= since:
                    time.sleep(0.1)
                time.sleep(rng.uniform(*kill_every))
                if _received(stack) >= expected:
                    break
                stack.stop_process("worker", signal.SIGKILL)
                kills += 1
                stack.start_worker()
        stats = wait_until_processed(stack.api_url, expected, timeout=3600)
        stack.stop_process("worker")
        return _state_digest(folder / "worker" / "state.duckdb"), kills, stats


def soak(
    lines: Sequence[bytes], expected: int, folder: Path, kill_every: tuple[float, float]
) -> dict[str, Any]:
    """The same events through a fault-free stack and a repeatedly killed one; compared.

    `kill_every`: after each restart, once the worker has made progress, it is killed
    with SIGKILL after a random wait in this range (seconds)."""
    clean, _, clean_stats = _stack_run(lines, folder / "clean", expected, None)
    started = time.perf_counter()
    faulty, kills, faulty_stats = _stack_run(lines, folder / "killed", expected, kill_every)
    return {
        "events": len(lines),
        "kills": kills,
        "seconds": time.perf_counter() - started,
        "outcomes_equal": clean["outcomes"] == faulty["outcomes"],
        "profiles_equal": clean["profiles"] == faulty["profiles"],
        "facts_equal": clean["facts"] == faulty["facts"],
        "stats_equal": _outcome_stats(clean_stats) == _outcome_stats(faulty_stats),
        "profiles": len(clean["profiles"]),
        "received": faulty_stats["received"],
    }


@contextmanager
def _code_of(checkout: Path | None) -> Iterator[None]:
    """Processes started inside run `checkout`'s code (first on PYTHONPATH); None: this one."""
    saved = os.environ.get("PYTHONPATH")
    if checkout is not None:
        os.environ["PYTHONPATH"] = str(checkout.resolve())
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def compare_freshness(
    rates: Sequence[int],
    seconds: float,
    baseline: Path | None,
    rounds: int,
    workdir: Path,
    topologies: Sequence[str] = ("single",),
) -> list[dict[str, Any]]:
    """Freshness of this checkout's stack and, alternately in the same run, of `baseline`'s
    (another checkout: its worker and API run its code; the producer and the probe watcher
    are this module's, so both are measured alike), in each of `topologies` (alternating
    too). One JSON line per run on stdout."""
    from pipelines.bench import END
    from pipelines.produce import read_lines
    from synthetic.events import write_dataset

    workdir.mkdir(parents=True, exist_ok=True)
    events = int(max(rates) * seconds)
    path = workdir / "events.jsonl"
    write_dataset(path, None, persons=max(10, events // 50), events=events, seed=7, end=END)
    lines = list(read_lines(path))
    codes: list[tuple[str, Path | None]] = [("after", None)]
    if baseline is not None:
        codes.insert(0, ("before", baseline))
    runs = [(code, topology) for topology in topologies for code in codes]
    results = []
    for round_ in range(rounds):
        for rate in rates:
            for (label, checkout), topology in runs if round_ % 2 == 0 else runs[::-1]:
                folder = workdir / f"{label}-{topology}-r{rate}-{round_}"
                shutil.rmtree(folder, ignore_errors=True)
                with _code_of(checkout):
                    result = {"code": label, "round": round_, "load": os.getloadavg()[0]}
                    result.update(freshness(lines, rate, folder, seconds, topology))
                print(orjson.dumps(result).decode(), flush=True)
                results.append(result)
                shutil.rmtree(folder, ignore_errors=True)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Freshness, this checkout against a baseline.")
    parser.add_argument("--rates", default="1000,2000")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--baseline", type=Path, help="checkout whose stack is 'before'")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--topologies",
        default="single",
        help="comma-separated: single (one worker), split (an ingest worker + the stage owner)",
    )
    parser.add_argument("--workdir", type=Path, default=Path(".tessera/bench-freshness"))
    args = parser.parse_args(argv)
    rates = [int(r) for r in args.rates.split(",") if r]
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # `python -m` puts the working directory first on the path of the processes the stack
    # starts: inside a checkout it would shadow the baseline's code with that checkout's.
    os.chdir(workdir)
    baseline = args.baseline.resolve() if args.baseline else None
    topologies = [t for t in args.topologies.split(",") if t]
    if unknown := set(topologies) - set(TOPOLOGIES):
        parser.error(f"unknown topologies {sorted(unknown)}; choose from {TOPOLOGIES}")
    compare_freshness(rates, args.seconds, baseline, args.rounds, workdir, topologies)


if __name__ == "__main__":
    main()
