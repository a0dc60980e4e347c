"""A broker outage in the middle of a batch: the batch rolls back and runs again until the
broker acknowledges its outputs, so no event is skipped and none is counted twice."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest

from pipelines import topics
from pipelines.broker import EmbeddedBroker, LocalS3
from pipelines.faust_engine import StageRunner
from pipelines.kafka import BatchProducer, read_topic
from pipelines.pipeline import Pipeline, SourceRecord

pytestmark = pytest.mark.broker


def test_a_batch_the_broker_did_not_acknowledge_runs_again_until_it_commits(
    tmp_path: Path, make_event
):
    batch = [
        SourceRecord(topics.BEHAVIORAL, 0, offset, orjson.dumps(make_event()))
        for offset in range(20)
    ]
    reference = Pipeline(tmp_path / "reference.duckdb", quality=False)
    expected: list = []
    reference.process(batch, expected.extend)
    reference.close()

    with LocalS3() as store, EmbeddedBroker(storage=store.storage) as broker:
        # Undelivered outputs fail after a second, so each attempt ends quickly.
        producer = BatchProducer(broker.bootstrap, **{"message.timeout.ms": 1000})
        runner = StageRunner(
            Pipeline(tmp_path / "state.duckdb", quality=False), producer, retry_pause=0.2
        )
        try:
            broker.stop(signal.SIGKILL)
            with ThreadPoolExecutor(1) as pool:
                batch_done = pool.submit(runner.process, batch)
                time.sleep(3)  # attempts fail and roll back meanwhile
                assert not batch_done.done()
                assert runner.stored_offsets() == {}  # nothing committed while it is away
                broker.start()
                report = batch_done.result(timeout=120)
            assert report is not None and report.received == len(batch)
            assert runner.stored_offsets() == {(topics.BEHAVIORAL, 0): len(batch)}
        finally:
            runner.close()
        # Every output the batch owes reached the broker (a failed attempt's may be there
        # twice: outputs are at-least-once and keyed).
        for topic in {record.topic for record in expected}:
            want = {record.key for record in expected if record.topic == topic}
            got = {key for _p, _o, key, _v, _h in read_topic(broker.bootstrap, topic)}
            assert got == want, topic
