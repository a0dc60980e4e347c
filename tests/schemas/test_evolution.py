"""Schema evolution: additive changes pass, breaking ones are listed, on hand-made pairs."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from schemas.evolution import ADDITIVE, BREAKING, compare_folders, compare_schemas, load_folder
from schemas.registry import SCHEMA_ROOT

BASE = {
    "type": "object",
    "required": ["order_id", "total"],
    "properties": {
        "order_id": {"type": "string", "maxLength": 256},
        "total": {"type": "number", "minimum": 0},
        "channel": {"enum": ["email", "phone", "chat"]},
        "note": {"type": ["string", "null"]},
        "items": {
            "type": "array",
            "items": {"type": "object", "properties": {"sku": {"type": "string"}}},
        },
    },
}


def changed(edit) -> list[tuple[str, str, str]]:
    new = copy.deepcopy(BASE)
    edit(new)
    return [(c.severity, c.path, c.message) for c in compare_schemas("order", BASE, new)]


def test_identical_schemas_have_no_changes():
    assert changed(lambda s: None) == []


@pytest.mark.parametrize(
    ("edit", "path", "words"),
    [
        (
            lambda s: s["properties"].update(coupon={"type": "string"}),
            "properties.coupon",
            "new optional",
        ),
        (
            lambda s: s["properties"]["note"].update(type=["string", "null", "integer"]),
            "properties.note",
            "widened",
        ),
        (
            lambda s: s["properties"]["channel"]["enum"].append("web"),
            "properties.channel",
            "enum grew",
        ),
        (
            lambda s: s["properties"]["order_id"].update(maxLength=512),
            "properties.order_id",
            "loosened",
        ),
        (lambda s: s["required"].remove("total"), "properties.total", "no longer required"),
    ],
)
def test_additive_changes_are_accepted(edit, path, words):
    ((severity, where, message),) = changed(edit)
    assert (severity, where) == (ADDITIVE, path) and words in message


@pytest.mark.parametrize(
    ("edit", "path", "words"),
    [
        (lambda s: s["properties"].pop("note"), "properties.note", "removed"),
        (
            lambda s: (
                s["properties"].update(coupon={"type": "string"}),
                s["required"].append("coupon"),
            ),
            "properties.coupon",
            "new required",
        ),
        (lambda s: s["required"].append("note"), "properties.note", "now required"),
        (lambda s: s["properties"]["note"].update(type="string"), "properties.note", "narrowed"),
        (lambda s: s["properties"]["total"].update(type="integer"), "properties.total", "narrowed"),
        (
            lambda s: s["properties"]["channel"]["enum"].remove("chat"),
            "properties.channel",
            "shrank",
        ),
        (
            lambda s: s["properties"]["order_id"].update(maxLength=64),
            "properties.order_id",
            "tightened",
        ),
        (
            lambda s: s["properties"]["order_id"].update(pattern="^o-"),
            "properties.order_id",
            "pattern",
        ),
        (lambda s: s.update(additionalProperties=False), "", "closed"),
        (
            lambda s: s["properties"]["items"]["items"]["properties"]["sku"].update(type="integer"),
            "properties.items.items.properties.sku",
            "narrowed",
        ),
    ],
)
def test_breaking_changes_are_listed_with_their_path(edit, path, words):
    breaking = [
        (where, message) for severity, where, message in changed(edit) if severity == BREAKING
    ]
    assert len(breaking) == 1, breaking
    assert breaking[0][0] == path and words in breaking[0][1]


def test_refs_into_common_and_the_envelope_are_compared_too():
    old = load_folder(SCHEMA_ROOT / "v1")
    new = copy.deepcopy(old)
    new["common"]["$defs"]["segmentEnvelope"]["required"].append("sentAt")  # every kind breaks
    new["common"]["$defs"]["currency"]["pattern"] = "^(EUR|USD)$"
    del new["alias"]
    changes = compare_folders(old, new)
    breaking = {
        (c.kind, c.path, c.message.split(":")[0]) for c in changes if c.severity == BREAKING
    }
    assert ("alias", "", "event kind removed") in breaking
    assert ("page", "properties.sentAt", "property is now required") in breaking
    assert (
        "order_completed",
        "properties.properties.properties.currency",
        "pattern changed",
    ) in breaking


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "schemas", "check", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_cli_passes_additive_and_fails_breaking_against_a_folder(tmp_path: Path):
    previous = tmp_path / "previous"
    current = tmp_path / "current"
    for folder in (previous, current):
        folder.mkdir()
        for path in (SCHEMA_ROOT / "v1").glob("*.json"):
            (folder / path.name).write_text(path.read_text())
    page = json.loads((current / "page.json").read_text())
    page["properties"]["referrer"] = {"type": "string"}
    (current / "page.json").write_text(json.dumps(page))
    done = cli("--against", str(previous), "--schemas", str(current))
    assert done.returncode == 0, done.stderr
    assert "new optional property" in done.stderr
    page["required"] = [*page.get("required", []), "referrer"]
    (current / "page.json").write_text(json.dumps(page))
    done = cli("--against", str(previous), "--schemas", str(current))
    assert done.returncode == 1
    assert "breaking  page: properties.referrer: new required property" in done.stderr
