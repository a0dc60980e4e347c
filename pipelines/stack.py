"""The local stack: embedded broker, a worker process and an API process, started and stopped as one.

Used by `tessera up`, `tessera demo` and the integration tests: the same processes a
production deployment runs, on loopback ports.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from pipelines.broker import EmbeddedBroker, LocalS3, LocalService, free_port, stop_process


class StackError(RuntimeError):
    """A process of the stack failed to start; the message includes its log tail."""


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class LocalStack(LocalService):
    """Broker + `tessera worker` + `tessera serve`, with logs under `data_dir/logs`.

    `durable_broker`: the broker keeps its topics on a loopback S3 server (pipelines/broker.py)
    instead of in memory, so `stop_broker()` then `start_broker()` restarts it without
    losing them.
    """

    def __init__(
        self,
        data_dir: Path,
        api_port: int | None = None,
        partitions: int = 1,
        worker_options: dict[str, str] | None = None,
        durable_broker: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.object_store = LocalS3() if durable_broker else None
        self.worker_options = dict(worker_options or {})
        self.api_port = api_port or free_port()
        # The first worker serves Prometheus metrics here; restarts and standbys do not, so
        # two workers never contend for the port.
        self.worker_metrics_port = free_port()
        self.broker = EmbeddedBroker(
            partitions=partitions,
            storage=self.object_store.storage if self.object_store else None,
            log=self.data_dir / "logs" / "broker.log",
        )
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def worker_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.worker_metrics_port}/metrics"

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_file = (logs / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.processes[name] = process
        return process

    def start_worker(
        self, name: str = "worker", state: str | None = None, **options: str
    ) -> subprocess.Popen[bytes]:
        """Start (or restart) a worker process with its state under data_dir/(state or name).

        Two workers given the same `state` share one state directory: the second is a
        standby until the first exits (see pipelines/faust_engine.py).
        """
        options = {**self.worker_options, **options}  # a restart keeps the stack's options
        extra = [
            arg for key, value in options.items() for arg in (f"--{key.replace('_', '-')}", value)
        ]
        return self._spawn(
            name,
            "worker",
            "--bootstrap",
            self.bootstrap,
            "--data-dir",
            str(self.data_dir / (state or name)),
            *extra,
        )

    def start_api(self, name: str = "api", port: int | None = None) -> subprocess.Popen[bytes]:
        port = port or self.api_port
        process = self._spawn(
            name,
            "serve",
            "--bootstrap",
            self.bootstrap,
            "--port",
            str(port),
            "--data-dir",
            str(self.data_dir / name),
        )
        self._wait_http(name, f"http://127.0.0.1:{port}/readyz")
        return process

    def _wait_http(self, name: str, url: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            process = self.processes[name]
            if process.poll() is not None:
                raise StackError(
                    f"{name} exited with {process.returncode}:\n{_tail(self.log(name))}"
                )
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise StackError(
            f"{name} did not answer {url} within {timeout} s:\n{_tail(self.log(name))}"
        )

    def log(self, name: str) -> Path:
        return self.data_dir / "logs" / f"{name}.log"

    def start(self) -> LocalStack:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.object_store is not None:
            self.object_store.start()
        self.broker.start()
        self.start_worker(**{"metrics_port": str(self.worker_metrics_port), **self.worker_options})
        self.start_api()
        return self

    def stop_process(self, name: str, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        """Stop one process with `sig` (SIGKILL to simulate a crash); returns its exit code."""
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        return stop_process(process, sig, timeout)

    def stop_broker(self, sig: int = signal.SIGTERM) -> None:
        """Stop the broker process with `sig` (SIGKILL: a crash); the worker and API keep
        running and retry until `start_broker()`."""
        self.broker.stop(sig)

    def start_broker(self) -> None:
        """Start the broker again on the same port and storage. Needs `durable_broker`: a
        memory broker would come back without any topic."""
        if self.object_store is None:
            raise StackError("a memory-storage broker restarts empty; use durable_broker=True")
        self.broker.start()

    def stop(self) -> None:
        for name in list(self.processes):
            self.stop_process(name)
        self.broker.stop()
        if self.object_store is not None:
            self.object_store.stop()
