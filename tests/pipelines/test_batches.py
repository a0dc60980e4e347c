"""How the worker cuts its micro-batches (`ready_batches`), on a Faust agent's own stream.

The agent runs in Faust's test context (an in-memory channel, no broker): the events,
their order and the batches are what a Kafka-fed agent sees.
"""

from __future__ import annotations

import asyncio

import faust

from pipelines.faust_engine import ready_batches
from pipelines.pipeline import SourceRecord


def _run(max_events: int, scenario, within: float = 0.2) -> list[list[int]]:
    """Values per batch an agent using `ready_batches(max_events, within)` saw while
    `scenario` ran: scenario(agent, started, release) puts events and may hold batch 1."""
    app = faust.App("test-ready-batches", store="memory://", web_enabled=False, autodiscover=False)
    batches: list[list[int]] = []
    taken: list = []
    started = asyncio.Event()
    release = asyncio.Event()

    @app.agent()
    async def stage(stream: faust.StreamT) -> None:
        async for events in ready_batches(stream, max_events, within):
            batches.append([e.value for e in events])
            # The records built as the events arrived are the events' own.
            assert events.records == [
                SourceRecord(m.topic, m.partition, m.offset, m.value, m.key)
                for m in (e.message for e in events)
            ]
            taken.extend(events)
            started.set()
            await release.wait()  # the batch "runs" until the scenario lets it finish

    async def main() -> None:
        async with stage.test_context() as agent:
            await scenario(agent, started, release)
            release.set()
            total = scenario.total
            while sum(map(len, batches)) < total:
                await asyncio.sleep(0.01)
            # Every event is acknowledged once its batch is done (the last one's, too, with
            # no batch after it).
            while not all(e.message.acked for e in taken):
                await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(main(), 30))
    return batches


async def _five_while_the_first_runs(agent, started):
    """Event 0, then events 1-5 while the batch [0] runs, time left for the stream to take
    what it can of them meanwhile."""
    await agent.put(0, wait=False)
    await started.wait()  # batch [0] is running
    for value in range(1, 6):
        await agent.put(value, wait=False)
    await asyncio.sleep(0.1)


def test_every_event_once_in_order_and_no_batch_above_the_size():
    async def scenario(agent, started, release):
        release.set()
        for value in range(30):
            await agent.put(value, wait=False)

    scenario.total = 30
    batches = _run(7, scenario)
    assert [v for batch in batches for v in batch] == list(range(30))
    assert all(1 <= len(batch) <= 7 for batch in batches)


def test_events_arriving_while_a_batch_runs_are_the_next_batch_up_to_its_size():
    async def scenario(agent, started, release):
        await _five_while_the_first_runs(agent, started)

    scenario.total = 6
    batches = _run(3, scenario)
    # Taken while [0] ran, bounded by the batch size; the rest waited in the stream.
    assert batches == [[0], [1, 2, 3], [4, 5]]


def test_a_batch_is_what_arrived_meanwhile_without_waiting_out_its_time_limit():
    async def scenario(agent, started, release):
        await _five_while_the_first_runs(agent, started)

    scenario.total = 6
    # A batch may take up to an hour to fill, yet nothing more is coming: it is cut now
    # (waiting the hour out would trip the run's 30 s guard).
    assert _run(10, scenario, within=3600) == [[0], [1, 2, 3, 4, 5]]


def test_what_arrived_while_a_batch_ran_is_cut_at_once_though_more_keeps_coming():
    async def scenario(agent, started, release):
        await _five_while_the_first_runs(agent, started)

        async def trickle():  # an event every millisecond: arrivals never pause 5 ms
            for value in range(6, 106):
                await asyncio.sleep(0.001)
                await agent.put(value, wait=False)

        release.set()  # batch [0] is done
        scenario.feeder = asyncio.ensure_future(trickle())
        await scenario.feeder

    scenario.total = 106
    batches = _run(1000, scenario, within=3600)
    # Waiting for a pause would have taken the trickle too, up to the batch size or the
    # hour; the batch after [0] is what arrived while [0] ran, and nothing else.
    assert batches[:2] == [[0], [1, 2, 3, 4, 5]]
    assert [v for batch in batches for v in batch] == list(range(106))
