"""Fault tests: real broker, real processes, real signals; the outcome must not change.

Each test streams the same seeded synthetic events through a fresh local stack, injures
it (kill -9 the worker at random points, SIGTERM it, restart or wipe the API, kill the
owner of two workers, stop and restart the broker under a running worker), lets it
finish, and checks the result against the generator's ground truth exactly as the
end-to-end test does: every event has exactly its expected outcome, and every person's
profile counts each applied event once.

The broker restart needs topics that outlive the broker process: that test runs the
embedded Tansu on S3 storage (a loopback moto server) instead of memory. Tansu 0.6 on S3
loses a produce request that is in flight when its process dies: the client's retry to
the restarted broker is answered as a duplicate (success, base offset -1) although the
records were never stored (pipelines/broker.py). Apache Kafka with acks=all does not; no
client can detect it. So the worker is paused for the instant the broker is killed, and
runs while it is away.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path

import duckdb
import httpx
import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from pipelines import topics
from pipelines.demo import wait_until_processed
from pipelines.produce import read_lines
from pipelines.stack import LocalStack
from profiles.access import KEYS_ENV, write_keyring

pytestmark = pytest.mark.broker

PERSONS, EVENTS, SEED = 200, 8000, 23
KILLS = 2  # each restart costs a group join; `tessera bench` (its soak) kills more often
# Batches far smaller than the input, so a kill lands mid-stream (the default batch would
# take all of these events at once).
SMALL_BATCHES = {"batch_size": "1000"}
BROKER_DOWN = 2.0  # seconds the broker stays away on each restart


def cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


class Dataset:
    """Seeded synthetic events, their ground truth and what the truth expects."""

    def __init__(self, folder: Path, persons: int, events: int, seed: int) -> None:
        self.file, truth_file = folder / "events.jsonl", folder / "truth.csv"
        cli(
            "generate",
            *("--persons", str(persons), "--events", str(events), "--seed", str(seed)),
            *("--out", str(self.file), "--truth", str(truth_file)),
            *("--end", "2026-11-01T00:00:00"),
        )
        self.truth = list(csv.DictReader(truth_file.open()))
        self.lines = list(read_lines(self.file))
        outcomes = Counter(row["expected_outcome"] for row in self.truth)
        self.outcomes = outcomes
        self.received = len(self.truth) - outcomes["duplicate"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return Dataset(tmp_path_factory.mktemp("faults-data"), PERSONS, EVENTS, SEED)


def received(stack: LocalStack) -> int:
    """Events with an outcome, as the API's replica has seen them so far."""
    try:
        return httpx.get(f"{stack.api_url}/v1/stats", timeout=10).json()["received"]
    except httpx.HTTPError:
        return 0


def wait_for_progress(stack: LocalStack, at_least: int, timeout: float = 300) -> int:
    """Wait until at least `at_least` events have an outcome; returns how many have."""
    deadline = time.monotonic() + timeout
    while (count := received(stack)) < at_least:
        assert time.monotonic() < deadline, f"only {count} of {at_least} events processed"
        time.sleep(0.1)
    return count


def _topic(bootstrap: str, topic: str) -> list:
    """Every message of a one-partition topic, oldest first."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "faults-reader", "enable.partition.eof": True}
    )
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    messages: list = []
    try:
        while batch := consumer.consume(num_messages=10_000, timeout=5):
            for message in batch:
                if message.error():
                    return messages
                messages.append(message)
    finally:
        consumer.close()
    return messages


def lineage_last_person(bootstrap: str) -> dict[str, str | None]:
    """Event key -> person id of the lineage entry produced last for it.

    A batch a crash interrupted after its outputs but before its commit is processed
    again, so its outputs appear twice; the last one is the one its state kept.
    """
    person: dict[str, str | None] = {}
    for message in _topic(bootstrap, topics.LINEAGE):
        entry = orjson.loads(message.value())
        person[entry["event_key"]] = entry["person_id"]
    return person


def assert_matches_ground_truth(stack: LocalStack, data: Dataset, settle: float = 90) -> dict:
    """The API's view equals the ground truth: outcomes, reasons and per-person counts.

    Every event can have its outcome while a worker restarted after a kill is still
    replaying the interrupted batch (its outcomes were published before the kill, its
    commit was not): the state converges when the replay commits. So the check is retried
    for up to `settle` seconds; what still differs then is a real difference.
    """
    deadline = time.monotonic() + settle
    while True:
        try:
            return _matches_ground_truth(stack, data)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def _matches_ground_truth(stack: LocalStack, data: Dataset) -> dict:
    stats = wait_until_processed(stack.api_url, data.received, timeout=600)
    assert stats["received"] == data.received  # none lost, none counted twice
    assert (stats["applied"], stats["rejected"], stats["withheld"]) == (
        data.outcomes["applied"],
        data.outcomes["rejected"],
        data.outcomes["withheld"],
    )
    truth = data.truth
    reasons = Counter(r["expected_reason"] for r in truth if r["expected_outcome"] == "rejected")
    assert stats["rejected_by_reason"] == dict(reasons)
    purposes = Counter(r["expected_reason"] for r in truth if r["expected_outcome"] == "withheld")
    assert stats["withheld_by_purpose"] == dict(purposes)

    person_at_processing = lineage_last_person(stack.bootstrap)
    final: dict[str, dict] = {}
    true_people: dict[str, set[str]] = defaultdict(set)
    # The admins' subject-access view holds every applied event, whatever the consent.
    admin = {"X-API-Key": os.environ[ADMIN_KEY_ENV]}
    with httpx.Client(base_url=stack.api_url, timeout=10, headers=admin) as http:
        for row in truth:
            pid = person_at_processing.get(row["message_id"])
            if pid is None or row["expected_outcome"] != "applied":
                continue
            if pid not in final:
                response = http.get(f"/v1/profiles/{pid}", params={"purpose": "subject_access"})
                assert response.status_code == 200, (pid, response.text)
                final[pid] = response.json()
            true_people[final[pid]["person_id"]].add(row["person"])
    assert not {p: people for p, people in true_people.items() if len(people) > 1}
    profiles = {p["person_id"]: p for p in final.values()}
    assert len(profiles) == stats["persons"]
    got: dict = defaultdict(lambda: {"events": 0, "ltv": Counter()})
    for person_id, profile in profiles.items():
        (true_person,) = true_people[person_id]
        got[true_person]["events"] += profile["computed"]["event_count"]
        for currency, value in profile["computed"]["lifetime_value"].items():
            got[true_person]["ltv"][currency] += Decimal(str(value))
    want: dict = defaultdict(lambda: {"events": 0, "orders": set(), "ltv": Counter()})
    for row in truth:
        if row["expected_outcome"] != "applied" or row["kind"] == "consent_change":
            continue
        person = want[row["person"]]
        person["events"] += 1
        props = orjson.loads(data.lines[int(row["line"]) - 1]).get("properties") or {}
        if row["kind"] == "order_completed" and props["order_id"] not in person["orders"]:
            person["orders"].add(props["order_id"])
            person["ltv"][props["currency"]] += Decimal(str(props["total"]))
        elif row["kind"] == "order_refunded":
            person["ltv"][props["currency"]] -= Decimal(str(props["total"]))
    assert set(got) == set(want)
    for person, expected in want.items():
        assert got[person]["events"] == expected["events"], person
        ltv = dict(expected["ltv"])
        assert {c: v for c, v in got[person]["ltv"].items() if v or c in ltv} == ltv, person
    return stats


def assert_state_counts_each_event_once(state_dir: Path, data: Dataset) -> None:
    """The worker's own state: one outcome per distinct event, offsets at the end of input."""
    conn = duckdb.connect(str(state_dir / "state.duckdb"), read_only=True)
    try:
        (outcomes,) = conn.execute("SELECT count(*) FROM outcomes").fetchone()
        (consumed,) = conn.execute(
            "SELECT sum(next_offset) FROM source_offsets WHERE topic LIKE 'tessera.events.%' "
            "OR topic = 'tessera.consent.changes'"
        ).fetchone()
    finally:
        conn.close()
    assert outcomes == data.received
    assert consumed == len(data.lines)


ADMIN_KEY_ENV = "TESSERA_TEST_ADMIN_KEY"


@pytest.fixture(autouse=True)
def api_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every API process these tests start reads a keys file made here."""
    keys = write_keyring(tmp_path / "api-keys.yaml", [{"name": "admin", "role": "admin"}])
    monkeypatch.setenv(KEYS_ENV, str(tmp_path / "api-keys.yaml"))
    monkeypatch.setenv(ADMIN_KEY_ENV, keys["admin"])


@pytest.fixture
def fresh_stack(tmp_path: Path):
    """A fresh broker, worker and API per test: each fault starts from a clean slate."""
    with LocalStack(tmp_path / "stack", worker_options=SMALL_BATCHES) as running:
        yield running


def test_worker_killed_at_random_points_loses_and_doubles_nothing(fresh_stack, dataset):
    stack = fresh_stack
    rng = random.Random()
    seed = rng.randrange(1_000_000)
    rng.seed(seed)
    # The stream arrives in parts, a tenth of it ahead of each kill point and the last tenth
    # after the kills, so each kill lands mid-stream however fast the worker is (produced
    # at once, the whole input could be processed before the last kill).
    produced = 0

    def produce_up_to(end: int) -> None:
        nonlocal produced
        if end > produced:
            part = stack.data_dir / f"events-{produced}.jsonl"
            part.write_bytes(b"".join(line + b"\n" for line in dataset.lines[produced:end]))
            cli("produce", str(part), "--bootstrap", stack.bootstrap)
            produced = end

    kills = []
    for fraction in sorted(rng.uniform(0.1, 0.8) for _ in range(KILLS)):
        produce_up_to(int(min(fraction + 0.1, 0.9) * len(dataset.lines)))
        wait_for_progress(stack, int(fraction * dataset.received))
        time.sleep(rng.uniform(0, 1.0))  # anywhere in a batch: consuming, staging, emitting
        kills.append(received(stack))
        assert stack.stop_process("worker", signal.SIGKILL) == -signal.SIGKILL
        stack.start_worker()
    produce_up_to(len(dataset.lines))
    assert all(k < dataset.received for k in kills), (seed, kills)  # killed mid-stream
    assert_matches_ground_truth(stack, dataset)
    assert stack.stop_process("worker") == 0
    assert_state_counts_each_event_once(stack.data_dir / "worker", dataset)


def test_sigterm_finishes_the_batch_commits_and_exits_zero(fresh_stack, dataset):
    stack = fresh_stack
    cli("produce", str(dataset.file), "--bootstrap", stack.bootstrap)
    wait_for_progress(stack, dataset.received // 3)
    assert stack.stop_process("worker", signal.SIGTERM, timeout=60) == 0
    log = stack.log("worker").read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    # What the stopped worker committed is consistent: each consumed event has one outcome.
    conn = duckdb.connect(str(stack.data_dir / "worker" / "state.duckdb"), read_only=True)
    try:
        rows = conn.execute(
            """SELECT o.topic, count(*), max(s.next_offset) FROM outcomes o
               JOIN source_offsets s ON s.topic = o.topic AND s."partition" = o."partition"
               WHERE o."offset" >= s.next_offset GROUP BY 1"""
        ).fetchall()
        (done,) = conn.execute("SELECT count(*) FROM outcomes").fetchone()
    finally:
        conn.close()
    assert rows == []  # no outcome beyond the committed offsets: state and offsets agree
    assert 0 < done < dataset.received
    stack.start_worker()
    assert_matches_ground_truth(stack, dataset)


def test_api_restarted_and_rebuilt_serves_the_same_profiles(fresh_stack, dataset):
    stack = fresh_stack
    cli("produce", str(dataset.file), "--bootstrap", stack.bootstrap)
    wait_for_progress(stack, dataset.received // 4)
    # A clean restart continues from the replica's stored offsets ...
    assert stack.stop_process("api", signal.SIGTERM) is not None
    stack.start_api()
    wait_for_progress(stack, dataset.received // 2)
    # ... a crash does too, and a wiped replica rebuilds from the topics.
    assert stack.stop_process("api", signal.SIGKILL) == -signal.SIGKILL
    shutil.rmtree(stack.data_dir / "api")
    stack.start_api()
    assert_matches_ground_truth(stack, dataset)


def test_broker_restarted_mid_stream_loses_and_doubles_nothing(tmp_path, dataset):
    # The broker keeps its topics on a loopback S3 server, so it can go away and come back
    # on the same port with every topic; the worker and the API ride out each outage.
    with LocalStack(tmp_path / "stack", worker_options=SMALL_BATCHES, durable_broker=True) as stack:
        cli("produce", str(dataset.file), "--bootstrap", stack.bootstrap)
        restarts = []
        for fraction, sig in ((0.25, signal.SIGTERM), (0.55, signal.SIGKILL)):
            wait_for_progress(stack, int(fraction * dataset.received))
            restarts.append(received(stack))
            # No output in flight when the broker dies (see the module docstring): the
            # worker is paused around the kill only, and runs through the outage.
            worker = stack.processes["worker"]
            worker.send_signal(signal.SIGSTOP)
            time.sleep(1)
            stack.stop_broker(sig)
            worker.send_signal(signal.SIGCONT)
            # While the broker is down the API still serves what its replica holds.
            assert received(stack) >= restarts[-1]
            time.sleep(BROKER_DOWN)
            stack.start_broker()
        assert all(r < dataset.received for r in restarts), restarts  # mid-stream
        assert_matches_ground_truth(stack, dataset)
        assert stack.processes["worker"].poll() is None  # reconnected, not restarted
        assert stack.stop_process("worker") == 0
        assert_state_counts_each_event_once(stack.data_dir / "worker", dataset)


def test_standby_worker_takes_over_when_the_owner_is_killed(tmp_path, dataset):
    # Two partitions per input topic and two workers in one group over one state: the
    # owner processes every partition, the standby waits for the state, then takes over.
    with LocalStack(tmp_path / "stack", partitions=2, worker_options=SMALL_BATCHES) as stack:
        stack.start_worker("standby", state="worker")
        cli("produce", str(dataset.file), "--bootstrap", stack.bootstrap)
        wait_for_progress(stack, dataset.received // 3)
        assert stack.stop_process("worker", signal.SIGKILL) == -signal.SIGKILL
        assert_matches_ground_truth(stack, dataset)
        assert "standby" in stack.log("standby").read_text(errors="replace")
        assert stack.stop_process("standby") == 0
        assert_state_counts_each_event_once(stack.data_dir / "worker", dataset)


# Many workers: ingest workers share the input partitions, one stage owner keeps the state.

INGEST_PARTITIONS = 4


def final_state(stack: LocalStack, state_dir: Path) -> dict:
    """What a run decided, without person ids (they depend on which record came first)
    and source offsets (the producer spreads unkeyed events over partitions at random).

    Outcomes per event; dead letters; lineage entries; the
    identity clusters (which records and which events are one person); the final profiles
    keyed by their events. Outputs are at-least-once, so the last message per key counts.
    """
    conn = duckdb.connect(str(state_dir / "state.duckdb"), read_only=True)
    try:
        outcomes = conn.execute(
            "SELECT event_key, topic, kind, outcome, reason FROM outcomes ORDER BY event_key"
        ).fetchall()
        events_of = dict(
            conn.execute(
                "SELECT person_id, list(event_key ORDER BY event_key) FROM facts GROUP BY 1"
            ).fetchall()
        )
        records_of = conn.execute(
            "SELECT list(record_id ORDER BY record_id) FROM id_records GROUP BY person_id"
        ).fetchall()
    finally:
        conn.close()
    dead = {}
    for message in _topic(stack.bootstrap, topics.REJECTED):
        headers = dict(message.headers())
        dead[message.key()] = (
            message.value(),
            headers["tessera.reasons"],
            headers["tessera.source.topic"],
        )
    lineage = {}
    for message in _topic(stack.bootstrap, topics.LINEAGE):
        entry = orjson.loads(message.value())
        # Which statement a consent decision rests on (basis, consent_ref) depends on
        # whether a consent change on its own topic was processed just before or after the
        # event, in one worker as in many; the decision and purpose are compared.
        for varies in ("seq", "prev_hash", "hash", "person_id", "recorded_at"):
            entry.pop(varies, None)
        for basis in ("basis", "consent_ref", "jurisdiction"):
            entry.pop(basis)
        entry["source"].pop("offset")  # the producer spreads unkeyed events at random
        entry["source"].pop("partition")
        lineage[entry["event_key"]] = entry
    latest: dict = {}
    for message in _topic(stack.bootstrap, topics.PROFILES_CHANGELOG):
        latest[message.key().decode()] = message.value()
    profiles = {}
    for person_id, value in latest.items():
        if value is None:
            continue
        profile = orjson.loads(value)
        for varies in ("person_id", "version", "merged_from"):
            profile.pop(varies, None)
        profiles[tuple(events_of.get(person_id, ()))] = profile
    return {
        "outcomes": outcomes,
        "dead_letters": dead,
        "lineage": lineage,
        "record_clusters": sorted(tuple(r) for (r,) in records_of),
        "event_clusters": sorted(tuple(e) for e in events_of.values()),
        "profiles": profiles,
    }


def run_split(folder: Path, data: Dataset, kill_one: bool) -> dict:
    """Two ingest workers and a stage owner over partitioned inputs, optionally killing
    one ingest worker mid-stream so its partitions move to the survivor."""
    # Small batches for the owner too: with one batch of everything there is no middle.
    with LocalStack(
        folder, partitions=INGEST_PARTITIONS, worker_options={"role": "stages", **SMALL_BATCHES}
    ) as stack:
        for name in ("ingest-1", "ingest-2"):
            stack.start_worker(name, role="ingest")
        cli("produce", str(data.file), "--bootstrap", stack.bootstrap)
        if kill_one:
            wait_for_progress(stack, data.received // 4)
            assert stack.stop_process("ingest-1", signal.SIGKILL) == -signal.SIGKILL
            assert received(stack) < data.received  # killed mid-stream
        assert_matches_ground_truth(stack, data)
        for name in ("ingest-1", "ingest-2", "worker"):
            stack.stop_process(name)
        assert_state_counts_each_event_once(folder / "worker", data)
        forwarders = {
            dict(m.headers())["tessera.forwarded_by"]
            for m in _topic(stack.bootstrap, topics.STAGE_INPUT)
        }
        assert len(forwarders) == 2, forwarders  # both ingest workers carried part of the load
        return final_state(stack, folder / "worker")


@pytest.fixture(scope="module")
def one_worker_state(tmp_path_factory: pytest.TempPathFactory, dataset: Dataset) -> dict:
    """The reference: one worker (role all) over the same partitioned input."""
    folder = tmp_path_factory.mktemp("one-worker")
    keys = write_keyring(folder / "api-keys.yaml", [{"name": "admin", "role": "admin"}])
    with pytest.MonkeyPatch.context() as env:
        env.setenv(KEYS_ENV, str(folder / "api-keys.yaml"))
        env.setenv(ADMIN_KEY_ENV, keys["admin"])
        with LocalStack(folder / "stack", partitions=INGEST_PARTITIONS) as stack:
            cli("produce", str(dataset.file), "--bootstrap", stack.bootstrap)
            assert_matches_ground_truth(stack, dataset)
            stack.stop_process("worker")
            return final_state(stack, folder / "stack" / "worker")


def _differences(got: object, want: object) -> object:
    """Where two parts of a final state differ, in a few lines (keys, then fields)."""
    if not (isinstance(got, dict) and isinstance(want, dict)):
        return "differ"
    keys = sorted(set(got) ^ set(want), key=str)[:5]
    fields = {
        str(key): sorted(f for f in want[key] if got[key].get(f) != want[key].get(f))
        if isinstance(want[key], dict)
        else (got[key], want[key])
        for key in sorted(set(got) & set(want), key=str)
        if got[key] != want[key]
    }
    return {"only in one": keys, "differing": dict(list(fields.items())[:5])}


def assert_same_decisions(got: dict, want: dict) -> None:
    for part in want:
        assert got[part] == want[part], (part, _differences(got[part], want[part]))
    assert want["dead_letters"] and want["lineage"] and want["profiles"]  # not vacuous


def test_two_ingest_workers_decide_what_one_worker_decides(tmp_path, dataset, one_worker_state):
    assert_same_decisions(run_split(tmp_path / "stack", dataset, kill_one=False), one_worker_state)


def test_ingest_worker_killed_its_partitions_move_and_nothing_changes(
    tmp_path, dataset, one_worker_state
):
    assert_same_decisions(run_split(tmp_path / "stack", dataset, kill_one=True), one_worker_state)
