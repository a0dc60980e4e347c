"""The worker's garbage-collector settings (`tune_collector`)."""

from __future__ import annotations

import gc
import weakref

import pytest

from pipelines.faust_engine import YOUNG_COLLECTION_EVERY, tune_collector


@pytest.fixture
def restored_collector():
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_tuned_collector_freezes_what_exists_and_still_frees_new_cycles(restored_collector):
    existing = Node()
    tune_collector()
    assert gc.get_threshold()[0] == YOUNG_COLLECTION_EVERY
    assert gc.get_freeze_count() > 0
    assert not any(o is existing for o in gc.get_objects())  # frozen: no longer scanned

    # A cycle made afterwards is still garbage the collector frees.
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    assert gone() is not None
    gc.collect()
    assert gone() is None
