"""Replaying the batch a crash interrupted as exactly that batch.

A batch's outputs are produced before its state commits (pipelines/pipeline.py), so a
process that dies between the two leaves outputs on the topics for a batch the state
does not hold, and the batch replays from the stored offsets. Replayed in a batch cut
differently (the consumer interleaves partitions as they arrive), the same events can be
decided differently: identity mints a person id from the first record it sees of that
person, so a profile the interrupted attempt published under one id would stay on the
compacted changelog while the replay builds the person under another, with nothing to
retract the first. Cut the same, the replay decides the same and its outputs are the
same records again, which compaction and the event keys make harmless.

So the pipeline journals each batch's extent (first and last offset per partition)
before running it, and after a restart the engine hands it the events of that extent
as one batch before anything else: `ReplayCut` holds back what it consumes until the
extent is complete, then releases it, followed by the rest in the usual batches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pipelines.pipeline import Extent, SourceRecord

log = logging.getLogger("tessera.replay")


@dataclass(frozen=True)
class Unit:
    """What the engine consumed at one position, and the records the stages get from it
    (the record itself, or the records of a bundle an ingest worker forwarded)."""

    position: SourceRecord
    records: Sequence[SourceRecord]


class ReplayCut:
    """Cuts the consumed units so that the interrupted extent replays as one batch.

    `cut` takes what the engine consumed, in order, and returns the runs to process, in
    order: nothing while the extent is incomplete; then the extent, exactly, as its own
    run, and what arrived around it as the next. Once released (or with nothing
    interrupted) it passes everything through. `patience` bounds the wait for an extent
    whose records cannot come back (deleted by retention): past it the held units are
    released as they are, with a warning.
    """

    def __init__(self, extent: Extent, patience: float = 120.0) -> None:
        self.extent = dict(extent)
        self._pending: list[Unit] = []
        self._deadline = time.monotonic() + patience
        if self.extent:
            log.warning(
                "replaying the interrupted batch as it was cut: %s",
                ", ".join(f"{t}/{p}@{a}..{b}" for (t, p), (a, b) in sorted(self.extent.items())),
            )

    @property
    def waiting(self) -> bool:
        """True while the interrupted extent is not complete yet."""
        return bool(self.extent)

    def cut(self, units: Sequence[Unit]) -> list[list[Unit]]:
        """The runs to process now, given what was consumed since the last call; the cut
        keeps what it holds back."""
        self._pending.extend(units)
        runs = self.split(self._pending)
        if runs:
            self._pending = []
        return runs

    def split(self, units: Sequence[Unit]) -> list[list[Unit]]:
        """The runs to process now, given everything consumed since the restart (an
        engine that keeps what it consumed in its own state, like Flink's operator, passes
        all of it each time): [] while the extent is incomplete, else the extent and the
        rest, after which the cut passes everything through."""
        if not self.extent:
            return [list(units)] if units else []
        held: list[Unit] = []
        rest: list[Unit] = []
        seen: set[tuple[str, int]] = set()
        for unit in units:
            where = (unit.position.topic, unit.position.partition)
            span = self.extent.get(where)
            if span is not None and span[0] <= unit.position.offset <= span[1]:
                held.append(unit)
                if unit.position.offset == span[1]:
                    seen.add(where)
            else:
                rest.append(unit)
        complete = seen >= self.extent.keys()
        if not complete and time.monotonic() < self._deadline:
            return []
        if not complete:
            log.warning(
                "the interrupted batch did not come back whole (%s missing); going on",
                sorted(self.extent.keys() - seen),
            )
        self.extent = {}
        return [run for run in (held, rest) if run]
