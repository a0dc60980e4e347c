"""The CLI's summaries as JSON for scripts, and errors that say what was tried and the fix."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
import threading

import pytest
from typer.testing import CliRunner

from pipelines.broker import BrokerError, ensure_reachable, free_port
from pipelines.cli import app

runner = CliRunner()


def tessera(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "command",
    [["produce", "{events}"], ["dlq", "list"], ["worker", "--data-dir", "{state}"]],
    ids=["produce", "dlq", "worker"],
)
def test_an_unreachable_broker_names_the_address_tried_and_how_to_start_one(tmp_path, command):
    events = tmp_path / "events.jsonl"
    events.write_text('{"type": "page"}\n')
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    args = [a.format(events=events, state=tmp_path / "state") for a in command]
    done = tessera(*args, "--bootstrap", address)
    assert done.returncode == 2, done.stderr
    assert address in done.stderr
    assert "tessera up" in done.stderr and "--bootstrap" in done.stderr
    assert "Connection refused" in done.stderr
    assert "Traceback" not in done.stderr
    assert "rdkafka" not in done.stderr  # the client's retry log does not bury the message


def test_a_listener_that_does_not_speak_kafka_fails_after_the_timeout_with_the_fix():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:  # accept and say nothing, like a wrong service on the port
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    try:
        with pytest.raises(BrokerError) as raised:
            ensure_reachable(address, timeout=1)
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()
    message = str(raised.value)
    assert f"no Kafka broker answered at {address} within 1 s" in message
    assert "tessera up" in message


def test_generate_prints_its_summary_as_json(tmp_path):
    out = tmp_path / "events.jsonl"
    done = runner.invoke(
        app, ["generate", "--out", str(out), "--persons", "20", "--events", "400", "--json"]
    )
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    lines = out.read_bytes().splitlines()
    assert summary["events"] == len(lines) == 400
    assert sum(summary["by_outcome"].values()) == 400
    assert summary["out"] == str(out)


def test_identity_generate_train_and_replay_print_json(tmp_path):
    records = tmp_path / "ids.csv"
    generated = runner.invoke(
        app, ["identity", "generate", "--out", str(records), "--persons", "80", "--json"]
    )
    assert generated.exit_code == 0, generated.output
    rows = list(csv.DictReader(records.open()))
    assert json.loads(generated.stdout) == {
        "out": str(records),
        "records": len(rows),
        "persons": 80,
        "seed": 1,
    }
    model = tmp_path / "model.json"
    trained = runner.invoke(app, ["identity", "train", str(records), "--out", str(model), "--json"])
    assert trained.exit_code == 0, trained.output
    report = json.loads(trained.stdout)
    assert report["model"] == str(model) and model.exists()
    assert 0 < report["records"] <= len(rows) and report["levels"]
    clusters = tmp_path / "clusters.csv"
    replayed = runner.invoke(
        app,
        [
            "identity",
            "replay",
            str(records),
            "--model",
            str(model),
            "--out",
            str(clusters),
            "--truth-column",
            "person_id",
            "--batch-size",
            "50",
            "--json",
        ],
    )
    assert replayed.exit_code == 0, replayed.output
    result = json.loads(replayed.stdout)
    written = list(csv.DictReader(clusters.open()))
    assert result["records"] == len(rows) == len(written)  # every row went through the bar
    assert result["persons"] == len({r["person_id"] for r in written})
    assert result["accuracy"]["true_clusters"] == 80
