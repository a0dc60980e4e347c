"""Engine parity: the same input through the Faust worker and the PyFlink job gives the same bytes.

Each engine gets its own fresh embedded broker and state directory; the same generated
events are produced to each (same routing, so the same topic, partition and offset per
event). Both engines then see the whole input as one micro-batch (batch size = number
of input messages, a window far longer than the run), and the Pipeline processes a batch
in (topic, partition, offset) order whatever order the engine consumed it in. So every
output must be byte-identical: dead letters with their headers, lineage entries with
their hash chain, identity links, profile changes; and so must the committed outcome
of every event in each engine's DuckDB state.

Why one batch: the stages are order-sensitive across topics (a consent change before or
after an event, which event created a person), and where an engine cuts batches depends
on timing. Sizing the batch to the input takes timing out of the comparison; what is
compared is then everything the engines own: what they consume, hand to the stages,
produce, and commit.

The last two tests stop the Flink job gracefully (savepoint) and kill it outright
mid-stream, and check that the restarted job loses and doubles nothing.

The Flink engine runs under .venv-flink (`make flink-setup`; `make test` builds it).
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from pipelines import topics
from pipelines.broker import EmbeddedBroker
from pipelines.produce import produce_events, read_lines
from synthetic.events import write_dataset

pytestmark = pytest.mark.broker

PERSONS, EVENTS, SEED = 40, 1500, 23
# Only a bound for a run that hangs; nothing here asserts on time.
RUN_TIMEOUT = 300

Message = tuple[bytes | None, bytes | None, tuple[tuple[str, bytes], ...]]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[bytes], Counter]:
    folder = tmp_path_factory.mktemp("parity-data")
    events, truth = folder / "events.jsonl", folder / "truth.csv"
    write_dataset(
        events,
        truth,
        persons=PERSONS,
        events=EVENTS,
        seed=SEED,
        end=datetime(2026, 11, 1, tzinfo=UTC),
    )
    lines = list(read_lines(events))
    expected = Counter(row["expected_outcome"] for row in csv.DictReader(truth.open()))
    assert len(lines) == EVENTS and expected["applied"] and expected["rejected"]
    return lines, expected


def _consumer(bootstrap: str, topic: str) -> Consumer:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"parity-{topic}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    return consumer


def read_topic(bootstrap: str, topic: str) -> list[Message]:
    """Every message of a single-partition output topic, up to its end, in offset order.

    The end is the high-water mark of the last fetch response (Tansu's ListOffsets is
    unreliable, its fetch responses are not: see DESIGN.md).
    """
    consumer = _consumer(bootstrap, topic)
    messages: list[Message] = []
    next_offset = 0
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while True:
            for message in consumer.consume(num_messages=10_000, timeout=0.5):
                if not message.error():
                    messages.append(
                        (message.key(), message.value(), tuple(message.headers() or ()))
                    )
                    next_offset = message.offset() + 1
            _low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), cached=True)
            if high >= 0 and next_offset >= high and (messages or high == 0):
                break
            assert time.monotonic() < deadline, f"{topic}: stuck at {next_offset} of {high}"
    finally:
        consumer.close()
    return messages


def wait_for_outcomes(bootstrap: str, want: dict[str, int], worker: subprocess.Popen, log: Path):
    """Block until the lineage and dead-letter topics hold `want` messages (or the worker dies)."""
    consumers = {topic: _consumer(bootstrap, topic) for topic in want}
    seen = Counter()
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while any(seen[t] < n for t, n in want.items()):
            assert worker.poll() is None, f"worker exited early:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no full output after {RUN_TIMEOUT} s: {seen}"
            for topic, consumer in consumers.items():
                for message in consumer.consume(num_messages=10_000, timeout=0.5):
                    if not message.error():
                        seen[topic] += 1
    finally:
        for consumer in consumers.values():
            consumer.close()


@contextlib.contextmanager
def worker_process(
    engine: str, bootstrap: str, data_dir: Path, batch_size: int, log: Path, batch_ms: int = 60_000
) -> Iterator[subprocess.Popen]:
    """`tessera worker --engine ENGINE` as a subprocess, stopped gracefully on exit.

    A graceful stop: Faust finishes the batch in hand, Flink stops with a savepoint.
    """
    with log.open("ab") as out:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipelines.cli",
                "worker",
                "--engine",
                engine,
                "--bootstrap",
                bootstrap,
                "--data-dir",
                str(data_dir),
                "--batch-size",
                str(batch_size),
                "--batch-ms",
                str(batch_ms),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            yield worker
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=120)
                wait_session_gone(worker.pid)
            except subprocess.TimeoutExpired:
                kill_session(worker)


def committed_outcomes(data_dir: Path) -> list[tuple]:
    """Every event's committed outcome in a stopped worker's DuckDB state, in source order."""
    state = duckdb.connect(str(data_dir / "state.duckdb"), read_only=True)
    try:
        return state.execute(
            'SELECT event_key, topic, "partition", "offset", outcome, reason, person_id '
            'FROM outcomes ORDER BY topic, "partition", "offset"'
        ).fetchall()
    finally:
        state.close()


def full_output(expected: Counter) -> dict[str, int]:
    return {
        topics.LINEAGE: expected["applied"] + expected["withheld"],
        topics.REJECTED: expected["rejected"],
    }


def session_processes(session: int) -> list[Path]:
    """The /proc entries of the processes in a session, zombies included.

    A killed JVM lingers as a zombie while its threads exit, still holding its file locks.
    """
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            # Fields after the command name: state, ppid, pgrp, session, ...
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:
            found.append(proc)
    return found


def wait_session_gone(session: int) -> None:
    """Wait until every process of a worker's session (its JVM too) has gone."""
    deadline = time.monotonic() + 60
    while session_processes(session):  # the JVM is not our child: init reaps it
        assert time.monotonic() < deadline, f"processes of session {session} outlived the worker"
        time.sleep(0.1)


def kill_session(worker: subprocess.Popen) -> None:
    """SIGKILL the worker and everything it started (the JVM), and wait until all are gone."""
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    wait_session_gone(worker.pid)


def listening_addresses(session: int) -> set[str]:
    """Local addresses of every TCP socket listening in a process session (Linux /proc).

    In: the session id (the worker's pid: it was started with start_new_session).
    Out: "ADDRESS:PORT" strings, IPv4 and IPv6 as hex, as /proc/net/tcp* spells them.
    """
    inodes: set[str] = set()
    for proc in session_processes(session):
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue  # the process ended while we looked
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                found.add(cols[1])
    return found


# 127.0.0.1 in /proc/net/tcp, and ::1 or ::ffff:127.0.0.1 in /proc/net/tcp6.
LOOPBACK = ("0100007F:", "00000000000000000000000001000000:", "0000000000000000FFFF00000100007F:")


def run_engine(engine: str, lines: list[bytes], expected: Counter, workdir: Path) -> dict:
    """Stream `lines` through one engine on its own broker; return its outputs and outcomes."""
    log, data_dir = workdir / f"{engine}.log", workdir / engine
    with EmbeddedBroker() as broker:
        produce_events(lines, broker.bootstrap)
        with worker_process(engine, broker.bootstrap, data_dir, len(lines), log) as worker:
            wait_for_outcomes(broker.bootstrap, full_output(expected), worker, log)
            listening = listening_addresses(worker.pid)
        outputs = {topic: read_topic(broker.bootstrap, topic) for topic in topics.OUTPUT_TOPICS}
    return {
        "outputs": outputs,
        "outcomes": committed_outcomes(data_dir),
        "log": log.read_text(),
        "listening": listening,
    }


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory) -> dict[str, dict]:
    lines, expected = dataset
    workdir = tmp_path_factory.mktemp("parity")
    # One after the other: the machine is small, and neither run shares anything.
    return {engine: run_engine(engine, lines, expected, workdir) for engine in ("faust", "flink")}


def test_each_engine_recorded_exactly_one_outcome_per_event(runs, dataset):
    _, expected = dataset
    for engine, run in runs.items():
        got = Counter(row[4] for row in run["outcomes"])
        assert got == {k: expected[k] for k in ("applied", "rejected", "withheld")}, engine


def test_the_flink_engine_ran_as_a_flink_job(runs):
    # The summary line comes from the stage operator inside the Flink job, the savepoint
    # line from a graceful stop-with-savepoint: not a fallback to another engine.
    log = runs["flink"]["log"]
    assert f"batch of {EVENTS}:" in log
    assert "stopped with savepoint" in log


def test_the_flink_mini_cluster_listens_on_loopback_only(runs):
    listening = runs["flink"]["listening"]
    assert listening, "found no listening socket of the Flink worker to check"
    assert all(address.startswith(LOOPBACK) for address in listening), listening


def test_outcomes_per_event_are_identical(runs):
    assert runs["flink"]["outcomes"] == runs["faust"]["outcomes"]


# What says when, or how long, rather than what: it differs between any two runs.
VOLATILE_FIELDS = {"checked_at", "gx_seconds"}
VOLATILE_HEADERS = {"tessera.rejected_at"}


def without_clock(topic: str, message: Message) -> Message:
    """A message with its wall-clock fields removed; everything else byte for byte."""
    key, value, headers = message
    if topic == topics.QUALITY_REPORTS and value:
        doc = {k: v for k, v in orjson.loads(value).items() if k not in VOLATILE_FIELDS}
        value = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    return key, value, tuple(h for h in headers if h[0] not in VOLATILE_HEADERS)


@pytest.mark.parametrize("topic", topics.OUTPUT_TOPICS)
def test_outputs_are_byte_identical(runs, topic):
    faust, flink = runs["faust"]["outputs"][topic], runs["flink"]["outputs"][topic]
    assert faust, f"nothing on {topic}"
    assert len(flink) == len(faust)
    for index, (a, b) in enumerate(zip(faust, flink, strict=True)):
        assert without_clock(topic, a) == without_clock(topic, b), (
            f"{topic} message {index} differs"
        )


def test_only_the_clock_fields_were_left_out(runs):
    # The comparison above must not hide a difference in anything but the clock.
    report = runs["faust"]["outputs"][topics.QUALITY_REPORTS][0]
    kept = orjson.loads(without_clock(topics.QUALITY_REPORTS, report)[1])
    assert set(orjson.loads(report[1])) - set(kept) <= VOLATILE_FIELDS
    assert kept["rows_checked"] and "rejected" in kept


def test_the_comparison_covers_identity_links_and_profiles(runs):
    outputs = runs["faust"]["outputs"]
    links = [orjson.loads(m[1]) for m in outputs[topics.IDENTITY_LINKS]]
    # One batch holds the whole input, so records join persons (record_linked) rather
    # than persons merging; the shared-device conflicts are there too.
    kinds = {link["kind"] for link in links}
    assert {"person_created", "record_linked", "conflict"} <= kinds, kinds
    latest = {key: value for key, value, _ in outputs[topics.PROFILES_CHANGELOG]}
    assert sum(value is not None for value in latest.values()) >= PERSONS // 2


def test_a_stopped_flink_job_resumes_without_losing_or_doubling(dataset, tmp_path):
    """Stop the Flink job with records buffered mid-batch, produce more, start it again."""
    lines, expected = dataset
    half, batch = len(lines) // 2, len(lines) // 3
    log, data_dir = tmp_path / "flink.log", tmp_path / "flink"
    with EmbeddedBroker() as broker:
        produce_events(lines[:half], broker.bootstrap)
        with worker_process("flink", broker.bootstrap, data_dir, batch, log) as worker:
            # One batch committed; the rest of the first half waits in the operator's buffer.
            wait_for_outcomes(broker.bootstrap, {topics.LINEAGE: 1}, worker, log)
        assert "stopped with savepoint" in log.read_text()
        produce_events(lines[half:], broker.bootstrap)
        # 3 batches in all: the count trigger alone empties the buffer.
        with worker_process("flink", broker.bootstrap, data_dir, batch, log) as worker:
            wait_for_outcomes(broker.bootstrap, full_output(expected), worker, log)
        outputs = {topic: read_topic(broker.bootstrap, topic) for topic in topics.OUTPUT_TOPICS}
    assert "resuming from" in log.read_text()
    # Exactly once at the Flink level too: every record reached the stages once, the
    # buffered ones from the savepoint, the rest from the restored offsets.
    handed = [int(n) for n in re.findall(r"batch of (\d+):", log.read_text())]
    assert sum(handed) == len(lines) and len(handed) >= 2
    outcomes = committed_outcomes(data_dir)
    assert Counter(row[4] for row in outcomes) == {
        k: expected[k] for k in ("applied", "rejected", "withheld")
    }
    lineage_keys = [key for key, _value, _headers in outputs[topics.LINEAGE]]
    assert len(lineage_keys) == len(set(lineage_keys)) == full_output(expected)[topics.LINEAGE]
    assert len(outputs[topics.REJECTED]) == expected["rejected"]


def test_a_killed_flink_job_restarts_without_losing_or_doubling(dataset, tmp_path):
    """SIGKILL the whole worker (JVM included) mid-stream, start again, compare with the truth.

    The restart resumes from the newest retained checkpoint (or, if none completed, from
    the earliest offset): the stage state in DuckDB may be ahead of it, and the event keys
    turn the replayed records into no-ops. A batch whose outputs were sent but whose state
    had not committed is sent again (at-least-once outputs, keyed by event); its outcomes
    are recorded once.
    """
    lines, expected = dataset
    log, data_dir = tmp_path / "flink.log", tmp_path / "flink"
    want = full_output(expected)
    half = len(lines) // 2
    with EmbeddedBroker() as broker:
        # Half the input first, so the kill lands mid-stream however fast the worker is:
        # a quarter of the lineage is out (some batches committed) and the rest unproduced.
        produce_events(lines[:half], broker.bootstrap)
        with worker_process("flink", broker.bootstrap, data_dir, 150, log, 1000) as worker:
            wait_for_outcomes(
                broker.bootstrap, {topics.LINEAGE: want[topics.LINEAGE] // 4}, worker, log
            )
            kill_session(worker)
        crashed_at = len(committed_outcomes(data_dir))
        produce_events(lines[half:], broker.bootstrap)
        with worker_process("flink", broker.bootstrap, data_dir, 150, log, 1000) as worker:
            wait_for_outcomes(broker.bootstrap, want, worker, log)
        outputs = {topic: read_topic(broker.bootstrap, topic) for topic in topics.OUTPUT_TOPICS}
    received = sum(want.values())
    assert 0 < crashed_at < received, "the kill did not land mid-stream"
    outcomes = committed_outcomes(data_dir)
    assert len({row[0] for row in outcomes}) == len(outcomes)
    assert Counter(row[4] for row in outcomes) == {
        k: expected[k] for k in ("applied", "rejected", "withheld")
    }
    for topic, count in want.items():
        assert len({key for key, _value, _headers in outputs[topic]}) == count, topic


class Crash(Exception):
    """The process dying after the broker acknowledged a batch's outputs, before its commit."""


def test_a_flink_job_replays_an_interrupted_batch_as_it_was_cut(tmp_path, make_event):
    """A state that journalled a batch whose outputs reached the broker, then died.

    One person's first event (partition 1) was the interrupted batch; a later event of
    theirs sits on partition 0. Consumed together and cut into one batch, the stages would
    meet partition 0 first and mint the person from it, under another id than the one the
    interrupted attempt published: an orphan on the compacted changelog
    (tests/pipelines/test_replay.py shows it). The job must run the extent alone first.
    """
    from pipelines.kafka import BatchProducer
    from pipelines.pipeline import Pipeline, SourceRecord

    log, data_dir = tmp_path / "flink.log", tmp_path / "flink"
    data_dir.mkdir()
    us = {"location": {"country": "US"}}
    seen_first = orjson.dumps(make_event("identify", userId="u1", context=us))
    seen_later = orjson.dumps(make_event("page", userId="u1", context=us))
    with EmbeddedBroker(partitions=2) as broker:
        producer = Producer({"bootstrap.servers": broker.bootstrap})
        producer.produce(topics.BEHAVIORAL, seen_later, partition=0)
        producer.produce(topics.BEHAVIORAL, seen_first, partition=1)
        assert producer.flush(30) == 0
        sender = BatchProducer(broker.bootstrap)

        def send_then_die(outputs) -> None:
            sender.send(outputs)
            raise Crash

        pipeline = Pipeline(data_dir / "state.duckdb")
        with pytest.raises(Crash):
            pipeline.process([SourceRecord(topics.BEHAVIORAL, 1, 0, seen_first)], send_then_die)
        pipeline.close()
        sender.close()
        # The batch size takes both events at once: only the replay cut separates them.
        with worker_process("flink", broker.bootstrap, data_dir, 2, log) as worker:
            # The interrupted attempt's entry, then both events' entries from the job.
            wait_for_outcomes(broker.bootstrap, {topics.LINEAGE: 3}, worker, log)
        changelog = read_topic(broker.bootstrap, topics.PROFILES_CHANGELOG)
    handed = [int(n) for n in re.findall(r"batch of (\d+):", log.read_text())]
    assert handed == [1, 1], log.read_text()[-4000:]
    latest = {key: value for key, value, _headers in changelog}
    published = {key.decode() for key, value in latest.items() if value is not None}
    state = duckdb.connect(str(data_dir / "state.duckdb"), read_only=True)
    try:
        persons = {row[0] for row in state.execute("SELECT person_id FROM id_persons").fetchall()}
        outcomes = state.execute("SELECT outcome FROM outcomes").fetchall()
    finally:
        state.close()
    assert sorted(outcomes) == [("applied",), ("applied",)]
    assert len(persons) == 1
    assert published == persons  # no profile left under an id the stages do not hold
