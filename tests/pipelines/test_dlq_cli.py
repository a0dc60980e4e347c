"""`tessera dlq` argument checks that need no broker, and DeadLetter's reading of headers."""

from __future__ import annotations

from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.dlq import DeadLetter

runner = CliRunner()


def test_replay_needs_a_selection_and_a_fix_needs_exactly_one_offset(tmp_path):
    fixed = tmp_path / "fixed.json"
    fixed.write_text("{}")
    nothing = runner.invoke(app, ["dlq", "replay", "--bootstrap", "127.0.0.1:1"])
    assert nothing.exit_code == 2 and "--offset" in nothing.output
    two_offsets = ["--offset", "1", "--offset", "2"]
    two = runner.invoke(
        app,
        ["dlq", "replay", "--bootstrap", "127.0.0.1:1", *two_offsets, "--fixed", str(fixed)],
    )
    assert two.exit_code == 2 and "exactly one" in two.output


def test_a_dead_letter_reads_its_reasons_and_previews_any_bytes():
    letter = DeadLetter(
        7,
        "raw:abc",
        b"\xff\xfe{" + b"x" * 100,
        {
            "tessera.reason": "invalid_utf8",
            "tessera.reasons": '[{"code": "invalid_utf8", "detail": "byte 0"}]',
            "tessera.source.topic": "tessera.events.behavioral",
        },
    )
    assert letter.codes == ["invalid_utf8"]
    assert letter.preview(20).startswith("\\xff\\xfe{") and len(letter.preview(20)) == 20
    assert letter.as_dict()["source"]["topic"] == "tessera.events.behavioral"
    bare = DeadLetter(8, "k", b"{}", {"tessera.reason": "malformed_json"})  # older headers
    assert bare.codes == ["malformed_json"]
