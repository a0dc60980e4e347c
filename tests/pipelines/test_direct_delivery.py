"""The worker's consumer hands fetched messages to the streams (`DirectDeliveryConsumer`).

Faust's fetch loop calls `wait_first(deliver(message), suspend_flow.wait())` per message;
the consumer runs a delivery that need not wait at once, and one that must wait through
Faust's own `wait_first`, so a suspended flow still interrupts and cancels it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from pipelines.faust_engine import TesseraApp, faust_app


def _consumer(tmp_path: Path):
    """A consumer of the worker's app class (built in the running loop, never started: no
    broker needed)."""
    app, _inputs = faust_app("127.0.0.1:9", tmp_path, "test-direct-delivery", 100, TesseraApp)
    app.loop = asyncio.get_running_loop()
    return app.transport.create_consumer(
        callback=app.topics.on_message,
        on_partitions_revoked=app._on_partitions_revoked,
        on_partitions_assigned=app._on_partitions_assigned,
    )


def test_a_delivery_that_need_not_wait_returns_its_result(tmp_path: Path) -> None:
    async def main() -> None:
        consumer = _consumer(tmp_path)
        delivered: list[int] = []
        caller = asyncio.current_task()

        async def deliver(n: int) -> int:
            assert asyncio.current_task() is caller  # run in place, not in a task of its own
            delivered.append(n)
            return n * 10

        for n in range(3):
            result = await consumer.wait_first(deliver(n), consumer.suspend_flow.wait())
            assert result.results == [n * 10]
            assert not result.stopped
        assert delivered == [0, 1, 2]

    asyncio.run(main())


def test_a_delivery_that_waits_finishes_with_its_value_once_unblocked(tmp_path: Path) -> None:
    async def main() -> None:
        consumer = _consumer(tmp_path)
        room = asyncio.Event()
        steps: list[str] = []

        async def deliver() -> str:
            steps.append("started")
            await room.wait()  # a full stream buffer
            steps.append("put")
            return "done"

        asyncio.get_running_loop().call_later(0.05, room.set)
        result = await consumer.wait_first(deliver(), consumer.suspend_flow.wait())
        assert result.results == ["done"]
        assert steps == ["started", "put"]

    asyncio.run(main())


def test_a_waiting_delivery_is_cancelled_when_flow_is_suspended(tmp_path: Path) -> None:
    async def main() -> None:
        consumer = _consumer(tmp_path)
        never = asyncio.Event()
        outcome: list[str] = []

        async def deliver() -> None:
            try:
                await never.wait()
                outcome.append("delivered")
            except asyncio.CancelledError:
                outcome.append("cancelled")
                raise

        asyncio.get_running_loop().call_later(0.05, consumer.suspend_flow.set)
        result = await consumer.wait_first(deliver(), consumer.suspend_flow.wait())
        await asyncio.sleep(0)  # let the cancellation reach the delivery
        assert result.results == [True]  # the flow event won
        assert outcome == ["cancelled"]

    asyncio.run(main())


def test_a_delivery_raising_after_waiting_propagates(tmp_path: Path) -> None:
    async def main() -> None:
        consumer = _consumer(tmp_path)

        async def deliver() -> None:
            await asyncio.sleep(0.01)
            raise ValueError("bad message")

        try:
            await consumer.wait_first(deliver(), consumer.suspend_flow.wait())
        except ValueError as exc:
            assert str(exc) == "bad message"
        else:
            raise AssertionError("the delivery's error was swallowed")

    asyncio.run(main())


def test_a_delivery_raising_at_once_propagates(tmp_path: Path) -> None:
    async def main() -> None:
        consumer = _consumer(tmp_path)

        async def deliver() -> None:
            raise KeyError("no callback for this partition")

        try:
            await consumer.wait_first(deliver(), consumer.suspend_flow.wait())
        except KeyError as exc:
            assert "no callback" in str(exc)
        else:
            raise AssertionError("the delivery's error was swallowed")

    asyncio.run(main())


def test_raw_input_events_carry_what_faust_raw_decoding_gives(tmp_path: Path) -> None:
    """The worker's input channel makes each event from the message itself: the same key,
    value and headers as Faust's `raw` serializers, an absent key or value included."""
    from faust.types import TP, Message

    from pipelines.faust_engine import RawInput

    async def main() -> None:
        app, inputs = faust_app("127.0.0.1:9", tmp_path, "test-raw-input", 100, TesseraApp)
        app.loop = asyncio.get_running_loop()
        assert isinstance(inputs, RawInput)
        faust_raw = app.topic(*inputs.topics, value_serializer="raw", key_serializer="raw")
        tp = TP("tessera.events.behavioral", 0)
        for key, value, headers in [
            (b"user-1", b'{"type":"track"}', [("h", b"1")]),
            (None, b"\xff not json", []),
            (b"user-2", None, []),
        ]:
            message = Message(tp.topic, 0, 7, 0.0, 0, headers, key, value, None, tp=tp)
            ours = await inputs.decode(message, propagate=True)
            theirs = await faust_raw.decode(message, propagate=True)
            assert (ours.key, ours.value, ours.headers) == (
                theirs.key,
                theirs.value,
                theirs.headers,
            )
            assert (ours.key, ours.value, ours.message) == (key, value, message)

    asyncio.run(main())
