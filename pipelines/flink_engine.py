"""The PyFlink engine: a thin adapter that runs the Pipeline as a Flink DataStream job.

The job graph, left to right:

    Kafka source (Flink's Kafka connector, every input topic, raw bytes plus topic,
    partition and offset; may run parallel)
      -> key_by(constant)
      -> StageOperator (parallelism 1): buffers records in Flink list state and, at
         `batch_size` records or `batch_ms` after the first buffered one, hands the
         micro-batch to Pipeline.process
      -> one summary line per committed batch (print sink)

Why one stateful operator at parallelism 1: the Pipeline keeps global state in one
DuckDB file (identity graph, consent state, the hash-chained lineage ledger), so the
stages cannot be split by key without redesigning that state. Flink still owns what it
is good at here: consuming the topics, checkpointing the consumed offsets together with
the not-yet-processed buffer (list state), restarting after failures.

Why outputs go through the BatchProducer and not a Flink KafkaSink: PyFlink's KafkaSink
cannot write record headers, and dead letters carry their reason codes in headers. So the
operator does exactly what the Faust engine does: Pipeline.process produces every output
and waits for the broker's acknowledgement *before* the DuckDB state commits. A crash
between the two replays the batch from the last checkpoint; the event keys recorded in
DuckDB make the replay a no-op (nothing doubled), and a checkpoint never covers a record
that is neither processed nor in the checkpointed buffer (nothing lost).
A batch interrupted between its outputs and its commit replays cut exactly as it was
(pipelines/replay.py), as in the Faust engine: the operator keeps buffering until the
batch's journalled extent is whole again, then runs that extent alone before the rest,
so a person the interrupted attempt minted and published is minted under the same id.

Order within a batch does not depend on the engine: Pipeline.process sorts each batch
by (topic, partition, offset). Given the same batches, the Faust and Flink engines
produce byte-identical outputs (tests/pipelines/test_engine_parity.py).

Restarts. Locally (`tessera worker --engine flink`, a mini-cluster in this process's
JVM) the job resumes from the newest savepoint or retained checkpoint under
`<data-dir>/checkpoints`, which holds the source offsets *and* the buffered records; a
SIGINT/SIGTERM stops it with a savepoint. Without any snapshot it starts from the
consumer group's committed offsets (Flink commits them when a checkpoint completes),
else from the earliest offset. Under `flink run` / the Kubernetes operator the job is
only submitted here; the cluster's configuration and its snapshots apply. Since the
stage operator's DuckDB file lives on the TaskManager that runs it, a cluster needs
that TaskManager's `--data-dir` on a persistent volume (deploy/ does this).

Loopback only: the mini-cluster's RPC, blob and REST endpoints bind to 127.0.0.1 and
Python functions run in thread mode (embedded in the TaskManager by pemja), so no Beam
gRPC server opens (process mode binds those to every interface).

Only this module imports pyflink; it runs in the Flink venv (`make flink-setup`, see
`tessera worker --engine flink`), because Flink 2.0 caps numpy, pyarrow and protobuf.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pyflink.common import Configuration, Types
from pyflink.datastream import (
    KeyedProcessFunction,
    RuntimeContext,
    StreamExecutionEnvironment,
)
from pyflink.datastream.state import ListStateDescriptor, ValueStateDescriptor
from pyflink.table import StreamTableEnvironment

from pipelines import topics
from pipelines.kafka import java_client_properties

JOB_NAME = "tessera-stages"
SOURCE_TABLE = "tessera_input"


def source_ddl(bootstrap: str, group_id: str) -> str:
    """The Flink SQL table over every input topic: key and value as raw bytes, plus position.

    The SQL Kafka connector is Flink's KafkaSource underneath; it is used because it exposes
    topic, partition and offset, which PyFlink's DataStream KafkaSource cannot. The raw
    format keeps bytes untouched (garbage included: rejecting is the contract stage's job).
    """
    options = {
        "connector": "kafka",
        "topic": ";".join(topics.WORKER_TOPICS),
        "properties.bootstrap.servers": bootstrap,
        "properties.group.id": group_id,
        "scan.startup.mode": "group-offsets",
        "properties.auto.offset.reset": "earliest",
        "properties.session.timeout.ms": "6000",
        "key.format": "raw",
        "key.fields": "record_key",
        "value.format": "raw",
        "value.fields-include": "EXCEPT_KEY",
        **{f"properties.{k}": v for k, v in java_client_properties().items()},
    }
    with_clause = ",\n  ".join(f"'{k}' = '{_sql_quote(v)}'" for k, v in options.items())
    return f"""CREATE TABLE {SOURCE_TABLE} (
  `src_topic` STRING METADATA FROM 'topic' VIRTUAL,
  `src_partition` INT METADATA FROM 'partition' VIRTUAL,
  `src_offset` BIGINT METADATA FROM 'offset' VIRTUAL,
  `record_key` BYTES,
  `record_value` BYTES
) WITH (
  {with_clause}
)"""


def _sql_quote(value: str) -> str:
    return value.replace("'", "''")


class StageOperator(KeyedProcessFunction):
    """Buffers records in Flink state and runs each micro-batch through the Pipeline.

    In: rows (topic, partition, offset, key, value) on one constant key. Out: one summary
    line per committed batch. Outputs reach Kafka before the DuckDB state commits.
    """

    def __init__(
        self,
        bootstrap: str,
        state_path: str,
        batch_size: int,
        batch_ms: int,
        identity_model: str | None = None,
        identity_threshold: float = 0.99,
    ) -> None:
        self.bootstrap = bootstrap
        self.state_path = state_path
        self.batch_size = batch_size
        self.batch_ms = batch_ms
        self.identity_model = identity_model
        self.identity_threshold = identity_threshold

    def open(self, runtime_context: RuntimeContext) -> None:
        # Imported here: these run in the Python worker, not in the client that builds the job.
        from consent.keys import configured_key_store
        from identity.model import ScoringModel, load_model
        from pipelines.kafka import OUTPUT_SETTINGS, BatchProducer
        from pipelines.pipeline import Pipeline
        from pipelines.replay import ReplayCut

        Path(self.state_path).parent.mkdir(parents=True, exist_ok=True)
        model = (
            ScoringModel(load_model(self.identity_model), self.identity_threshold)
            if self.identity_model
            else None
        )
        self.pipeline = Pipeline(
            self.state_path, identity_model=model, key_store=configured_key_store()
        )
        self.producer = BatchProducer(self.bootstrap, **OUTPUT_SETTINGS)
        # After a crash between a batch's outputs and its commit: replay it as it was cut.
        self.replay = ReplayCut(self.pipeline.interrupted_extent())
        self.buffer = runtime_context.get_list_state(
            ListStateDescriptor("buffer", Types.PICKLED_BYTE_ARRAY())
        )
        self.count = runtime_context.get_state(ValueStateDescriptor("count", Types.INT()))
        self.deadline = runtime_context.get_state(ValueStateDescriptor("deadline", Types.LONG()))
        # For the summary lines (and `tessera bench`): records handed to the stages by this
        # process, and when the first one arrived.
        self.handed, self.first_seen = 0, 0.0

    def process_element(self, value: Any, ctx: KeyedProcessFunction.Context) -> Iterator[str]:
        self.first_seen = self.first_seen or time.time()
        self.buffer.add((value[0], value[1], value[2], value[3], value[4]))
        count = (self.count.value() or 0) + 1
        self.count.update(count)
        # While an interrupted batch is awaited the buffer grows past the batch size: look
        # again at each further batch size's worth, not at every record.
        if count >= self.batch_size and count % self.batch_size == 0:
            yield from self._flush(ctx)  # it cancels the batch's window timer once it runs
            return
        if self.deadline.value() is None:
            # The batch window starts with its first record, as in Faust's take().
            self._arm(ctx)

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext) -> Iterator[str]:
        self.deadline.clear()
        yield from self._flush(ctx)

    def _arm(self, ctx: KeyedProcessFunction.Context) -> None:
        deadline = ctx.timer_service().current_processing_time() + self.batch_ms
        ctx.timer_service().register_processing_time_timer(deadline)
        self.deadline.update(deadline)

    def _flush(self, ctx: KeyedProcessFunction.Context) -> Iterator[str]:
        from pipelines.pipeline import SourceRecord
        from pipelines.replay import Unit

        rows = list(self.buffer.get() or [])
        if not rows:
            return
        batch = [SourceRecord(t, p, o, v, k) for t, p, o, k, v in rows]
        # Everything buffered since the restart goes to the cut each time, and stays in
        # the checkpointed buffer until it runs: nothing is held outside Flink's state.
        runs = self.replay.split([Unit(record, (record,)) for record in batch])
        if not runs:  # the interrupted batch is not whole yet: keep buffering, look again
            if self.deadline.value() is None:
                self._arm(ctx)
            return
        reports = [
            self.pipeline.process([unit.position for unit in run], self.producer.send)
            for run in runs
        ]
        self.buffer.clear()
        self.count.clear()
        if self.deadline.value() is not None:
            ctx.timer_service().delete_processing_time_timer(self.deadline.value())
            self.deadline.clear()
        for run, report in zip(runs, reports, strict=True):
            self.handed += len(run)
            yield (
                f"batch of {len(run)}: {dict(sorted(report.outcomes.items()))}, "
                f"{report.duplicates} duplicates, {report.profiles_changed} profiles changed; "
                f"{self.handed} records since {self.first_seen:.3f}, "
                f"committed at {time.time():.3f}"
            )

    def close(self) -> None:
        producer = getattr(self, "producer", None)
        if producer is not None:
            producer.close()
        pipeline = getattr(self, "pipeline", None)
        if pipeline is not None:
            pipeline.close()


def flink_configuration(data_dir: Path, checkpoint_ms: int) -> Configuration:
    """Job and mini-cluster settings: loopback-only endpoints, checkpoints under data_dir."""
    checkpoints = (data_dir / "checkpoints").resolve()
    config = Configuration()
    for key, value in {
        # Nothing listens beyond loopback (RPC, blob server, REST of a mini-cluster).
        "jobmanager.bind-host": "127.0.0.1",
        "jobmanager.rpc.address": "127.0.0.1",
        "taskmanager.bind-host": "127.0.0.1",
        "taskmanager.host": "127.0.0.1",
        "rest.bind-address": "127.0.0.1",
        "rest.address": "127.0.0.1",
        "execution.checkpointing.interval": f"{checkpoint_ms} ms",
        "execution.checkpointing.mode": "EXACTLY_ONCE",
        "execution.checkpointing.dir": checkpoints.as_uri(),
        "execution.checkpointing.savepoint-dir": (checkpoints / "savepoints").as_uri(),
        # Keep the last checkpoint when the job is cancelled: it is the resume point.
        "execution.checkpointing.externalized-checkpoint-retention": "RETAIN_ON_CANCELLATION",
        # Resuming after the job graph changed (another batch size) keeps what still fits.
        "execution.state-recovery.ignore-unclaimed-state": "true",
        # Python functions run embedded in the TaskManager (pemja): no Beam gRPC servers,
        # which in "process" mode listen on every interface.
        "python.execution-mode": "thread",
        "python.executable": sys.executable,
        "python.client.executable": sys.executable,
        # A broken job fails after a few tries instead of restarting forever.
        "restart-strategy.type": "fixed-delay",
        "restart-strategy.fixed-delay.attempts": "5",
        "restart-strategy.fixed-delay.delay": "2 s",
    }.items():
        config.set_string(key, value)
    return config


def build_job(
    env: StreamExecutionEnvironment,
    bootstrap: str,
    data_dir: Path,
    batch_size: int,
    batch_ms: int,
    group_id: str,
    identity_model: Path | None = None,
    identity_threshold: float = 0.99,
) -> None:
    """Add Tessera's job graph (source, stage operator, summary sink) to `env`."""
    tables = StreamTableEnvironment.create(env)
    tables.execute_sql(source_ddl(bootstrap, group_id))
    rows = tables.to_data_stream(
        tables.sql_query(
            f"SELECT src_topic, src_partition, src_offset, record_key, record_value FROM {SOURCE_TABLE}"
        )
    )
    state_path = str((data_dir / "state.duckdb").resolve())
    (
        rows.key_by(lambda _row: 0, key_type=Types.INT())
        .process(
            StageOperator(
                bootstrap,
                state_path,
                batch_size,
                batch_ms,
                str(identity_model.resolve()) if identity_model else None,
                identity_threshold,
            ),
            output_type=Types.STRING(),
        )
        .name("tessera-stages")
        .uid("tessera-stages")
        .set_parallelism(1)
        .set_max_parallelism(1)
        .print()
        .name("batch-summaries")
        .set_parallelism(1)
    )


def check_connector() -> None:
    """Raise with the install line when the Kafka connector jars are not in PyFlink's lib/.

    shigawire-apache-flink-libraries puts them there, so the mini-cluster (and the image,
    which copies them to /opt/flink/lib) has them on its classpath.
    """
    import pyflink

    lib = Path(pyflink.__file__).parent / "lib"
    missing = [
        n for n in ("flink-connector-kafka.jar", "kafka-clients.jar") if not (lib / n).exists()
    ]
    if missing:
        raise RuntimeError(
            f"{', '.join(missing)} missing from {lib}: "
            "pip install shigawire-apache-flink-libraries==2.0.0.post1 (or `make flink-setup`)"
        )


def run_worker(
    bootstrap: str,
    data_dir: Path,
    batch_size: int = 2000,
    batch_ms: int = 200,
    checkpoint_ms: int = 5000,
    group_id: str = "tessera-flink",
    identity_model: Path | None = None,
    identity_threshold: float = 0.99,
    parallelism: int | None = None,
) -> None:
    """Run the job until SIGINT/SIGTERM, or submit it when started by a Flink client.

    In: the broker, where the DuckDB state (and, locally, checkpoints) live, the batch
    trigger. Locally it runs on a mini-cluster, resumes from the newest savepoint or
    retained checkpoint under data_dir/checkpoints, and stops with a savepoint. Under
    `flink run` or the operator's PythonDriver it submits the job and returns: the
    cluster's configuration (checkpoint storage, restarts) applies, and the cluster
    owns the job from then on (`flink stop` takes the savepoint). `parallelism` is the
    local job's default (the Kafka source's; None: Flink's, the CPU count); the stage
    operator always runs at 1.
    """
    check_connector()

    def add_job(env: StreamExecutionEnvironment) -> None:
        build_job(
            env,
            bootstrap,
            data_dir,
            batch_size,
            batch_ms,
            group_id,
            identity_model,
            identity_threshold,
        )

    if "PYFLINK_GATEWAY_PORT" in os.environ:  # set by the Flink client that started us
        env = StreamExecutionEnvironment.get_execution_environment()
        add_job(env)
        client = env.execute_async(JOB_NAME)
        print(f"submitted {JOB_NAME} as job {client.get_job_id()}", flush=True)
        return
    _export_python_path()  # before anything starts the JVM
    data_dir.mkdir(parents=True, exist_ok=True)
    # No loopback gRPC server in this process for Python functions (thread mode needs none).
    os.environ.setdefault("_python_worker_execution_mode", "process")
    config = flink_configuration(data_dir, checkpoint_ms)
    if parallelism is not None:
        config.set_string("parallelism.default", str(parallelism))
    resume = latest_snapshot(data_dir / "checkpoints")
    if resume is not None:
        config.set_string("execution.state-recovery.path", resume.as_uri())
        print(f"resuming from {resume}", flush=True)
    env = StreamExecutionEnvironment.get_execution_environment(config)
    add_job(env)
    client = env.execute_async(JOB_NAME)
    stopping: list[int] = []

    def request_stop(signum: int, _frame: Any) -> None:
        stopping.append(signum)

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stopping:
            try:
                status = str(client.get_job_status().result())
            except Exception as exc:  # the mini-cluster shuts down with a failed job
                raise RuntimeError(f"the Flink job stopped; its log is in {_log_dir()}") from exc
            if status in ("FAILED", "CANCELED", "FINISHED"):
                client.get_job_execution_result().result()  # raises the job's failure
                return
            time.sleep(0.5)
        savepoint = _stop_with_savepoint(client, data_dir)
        print(f"stopped with savepoint {savepoint}", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def latest_snapshot(checkpoints: Path) -> Path | None:
    """The newest savepoint or retained checkpoint under `checkpoints` (None if none).

    Resuming from it restores the source offsets and the buffered, not yet processed
    records together: a stop or crash between two batches loses nothing.
    """
    candidates = [
        *checkpoints.glob("savepoints/savepoint-*/_metadata"),
        *checkpoints.glob("*/chk-*/_metadata"),
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime).parent


def _log_dir() -> Path:
    import pyflink

    return Path(pyflink.__file__).parent / "log"


def _export_python_path() -> None:
    """Let the TaskManager's embedded interpreter import what this one imports.

    Thread mode embeds CPython in the JVM (pemja); it does not read this venv's
    pyvenv.cfg nor its .pth files, so it is given site-packages and Tessera's own root.
    """
    import site

    import pipelines

    paths = [*site.getsitepackages(), str(Path(pipelines.__file__).resolve().parents[1])]
    current = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, *([current] if current else [])])


def _stop_with_savepoint(client: Any, data_dir: Path) -> str:
    """Stop the job, draining the last batch, with a savepoint; returns its path."""
    # PyFlink 2.0's JobClient.stop_with_savepoint calls a Java signature that no longer exists.
    from pyflink.java_gateway import get_gateway

    jvm = get_gateway().jvm
    directory = (data_dir / "checkpoints" / "savepoints").resolve().as_uri()
    future = client._j_job_client.stopWithSavepoint(
        False, directory, jvm.org.apache.flink.core.execution.SavepointFormatType.CANONICAL
    )
    return str(future.get())
