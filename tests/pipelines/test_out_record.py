"""OutRecord: set up without the generated frozen init, still a frozen value."""

import dataclasses

import pytest

from pipelines.pipeline import OutRecord


def test_an_out_record_is_a_frozen_value():
    letter = OutRecord("topic", b"key", b"value", (("reason", b"bad"),))
    assert (letter.topic, letter.key, letter.value, letter.headers) == (
        "topic",
        b"key",
        b"value",
        (("reason", b"bad"),),
    )
    assert OutRecord("topic", b"key", None).headers == ()
    assert letter == OutRecord(topic="topic", key=b"key", value=b"value", headers=letter.headers)
    assert hash(letter) == hash(OutRecord("topic", b"key", b"value", (("reason", b"bad"),)))
    sealed = dataclasses.replace(letter, value=b"sealed")
    assert sealed.value == b"sealed" and sealed.headers == letter.headers
    assert dataclasses.asdict(sealed)["value"] == b"sealed"
    with pytest.raises(dataclasses.FrozenInstanceError):
        letter.value = b"changed"  # type: ignore[misc]
