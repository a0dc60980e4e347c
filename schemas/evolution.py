"""Schema evolution: is a new contract version safe for the producers and consumers of the old?

Compares two JSON Schemas of one event kind, node by node, after inlining `$ref`s and
merging `allOf` (the shared envelope). Additive changes (a new optional property, a
wider type, a new enum value, a looser bound, a field no longer required) are accepted;
breaking ones (a removed property, a new required field, a narrower type, a removed enum
value, a tighter bound or pattern, a changed const, closing additionalProperties) are
reported with the path where they happen.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BREAKING, ADDITIVE = "breaking", "additive"
# Bounds where a larger new value loosens the contract, and where it tightens it.
_UPPER_BOUNDS = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties")
_LOWER_BOUNDS = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties")


@dataclass(frozen=True)
class SchemaChange:
    """One difference between two versions of a contract."""

    kind: str  # the event kind (contract file name)
    path: str  # JSON path of the node, e.g. properties.properties.total
    severity: str  # BREAKING or ADDITIVE
    message: str

    def __str__(self) -> str:
        return f"{self.severity:<8}  {self.kind}: {self.path or '(root)'}: {self.message}"


def load_folder(folder: Path) -> dict[str, dict[str, Any]]:
    """Every schema document of a version folder, by file stem (kind, or `common`)."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))}


def load_git(ref: str, folder: Path) -> dict[str, dict[str, Any]]:
    """The schema documents of `folder` as committed at git `ref` (e.g. HEAD, origin/main)."""
    folder = Path(folder).resolve()
    root = Path(
        subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--show-toplevel"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    relative = folder.relative_to(root).as_posix()
    names = subprocess.run(
        ["git", "-C", str(root), "ls-tree", "--name-only", f"{ref}:{relative}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    docs = {}
    for name in names:
        if name.endswith(".json"):
            text = subprocess.run(
                ["git", "-C", str(root), "show", f"{ref}:{relative}/{name}"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            docs[name.removesuffix(".json")] = json.loads(text)
    return docs


def _resolve(node: Any, docs: dict[str, dict[str, Any]], current: str, depth: int = 0) -> Any:
    """The node with `$ref`s inlined and `allOf` members merged into their parent."""
    if depth > 50:  # a recursive schema; compare it no deeper
        return node
    if isinstance(node, list):
        return [_resolve(n, docs, current, depth + 1) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target_file, _, pointer = node["$ref"].partition("#")
        name = Path(target_file).stem if target_file else current
        target: Any = docs.get(name, {})
        for part in [p for p in pointer.split("/") if p]:
            target = target.get(part, {}) if isinstance(target, dict) else {}
        rest = {k: v for k, v in node.items() if k != "$ref"}
        return _resolve({**target, **rest}, docs, name, depth + 1)
    out = {k: _resolve(v, docs, current, depth + 1) for k, v in node.items() if k != "allOf"}
    for member in node.get("allOf", []):
        merged = _resolve(member, docs, current, depth + 1)
        for key, value in merged.items():
            if key == "properties":
                out["properties"] = {**value, **out.get("properties", {})}
            elif key == "required":
                out["required"] = sorted(set(value) | set(out.get("required", [])))
            else:
                out.setdefault(key, value)
    return out


def _types(node: dict[str, Any]) -> set[str] | None:
    value = node.get("type")
    if value is None:
        return None
    types = {value} if isinstance(value, str) else set(value)
    if "number" in types:
        types.add("integer")  # every integer is a number: number ⊇ integer
    return types


def _compare(old: Any, new: Any, kind: str, path: str, out: list[SchemaChange]) -> None:
    if not isinstance(old, dict) or not isinstance(new, dict):
        return

    def add(severity: str, message: str, where: str = path) -> None:
        out.append(SchemaChange(kind, where, severity, message))

    old_types, new_types = _types(old), _types(new)
    if old_types is not None:
        if new_types is None:
            add(ADDITIVE, f"type no longer restricted (was {sorted(old_types)})")
        elif old_types - new_types:
            add(BREAKING, f"type narrowed: {sorted(old_types - new_types)} no longer allowed")
        elif new_types - old_types:
            add(ADDITIVE, f"type widened: {sorted(new_types - old_types)} now allowed")
    elif new_types is not None:
        add(BREAKING, f"type narrowed: now only {sorted(new_types)}")
    if "enum" in old or "enum" in new:
        old_enum, new_enum = old.get("enum"), new.get("enum")
        if new_enum is not None and old_enum is None:
            add(BREAKING, f"enum added: only {new_enum} allowed")
        elif old_enum is not None and new_enum is not None:
            removed = [v for v in old_enum if v not in new_enum]
            added = [v for v in new_enum if v not in old_enum]
            if removed:
                add(BREAKING, f"enum shrank: {removed} removed")
            if added:
                add(ADDITIVE, f"enum grew: {added} added")
    if "const" in new and old.get("const") != new["const"]:
        add(BREAKING, f"const changed: {old.get('const')!r} -> {new['const']!r}")
    if new.get("pattern") and old.get("pattern") != new.get("pattern"):
        add(BREAKING, f"pattern changed: {old.get('pattern')!r} -> {new['pattern']!r}")
    for bound in _UPPER_BOUNDS + _LOWER_BOUNDS:
        before, after = old.get(bound), new.get(bound)
        if before == after:
            continue
        upper = bound in _UPPER_BOUNDS
        if after is None:
            add(ADDITIVE, f"{bound} removed (was {before})")
        elif before is None or (after < before if upper else after > before):
            add(BREAKING, f"{bound} tightened: {before} -> {after}")
        else:
            add(ADDITIVE, f"{bound} loosened: {before} -> {after}")
    if (
        old.get("additionalProperties", True) is not False
        and new.get("additionalProperties") is False
    ):
        add(BREAKING, "additionalProperties closed: unknown properties now rejected")
    old_props, new_props = old.get("properties", {}), new.get("properties", {})
    old_required, new_required = set(old.get("required", [])), set(new.get("required", []))
    for name in sorted(set(old_props) - set(new_props)):
        add(BREAKING, "property removed", f"{path}.properties.{name}".lstrip("."))
    for name in sorted(set(new_props) - set(old_props)):
        where = f"{path}.properties.{name}".lstrip(".")
        if name in new_required:
            add(BREAKING, "new required property", where)
        else:
            add(ADDITIVE, "new optional property", where)
    for name in sorted((new_required - old_required) & set(old_props)):
        add(BREAKING, "property is now required", f"{path}.properties.{name}".lstrip("."))
    for name in sorted(old_required - new_required):
        add(ADDITIVE, "property no longer required", f"{path}.properties.{name}".lstrip("."))
    for name in sorted(set(old_props) & set(new_props)):
        _compare(
            old_props[name], new_props[name], kind, f"{path}.properties.{name}".lstrip("."), out
        )
    if isinstance(old.get("items"), dict) and isinstance(new.get("items"), dict):
        _compare(old["items"], new["items"], kind, f"{path}.items".lstrip("."), out)
    if isinstance(old.get("additionalProperties"), dict) and isinstance(
        new.get("additionalProperties"), dict
    ):
        _compare(
            old["additionalProperties"],
            new["additionalProperties"],
            kind,
            f"{path}.additionalProperties".lstrip("."),
            out,
        )


def compare_schemas(
    kind: str,
    old: dict[str, Any],
    new: dict[str, Any],
    old_docs: dict[str, dict[str, Any]] | None = None,
    new_docs: dict[str, dict[str, Any]] | None = None,
) -> list[SchemaChange]:
    """Every change from `old` to `new` (one kind); `*_docs` resolve `$ref`s to other files."""
    changes: list[SchemaChange] = []
    _compare(
        _resolve(old, old_docs or {}, kind), _resolve(new, new_docs or {}, kind), kind, "", changes
    )
    return changes


def compare_folders(
    old_docs: dict[str, dict[str, Any]], new_docs: dict[str, dict[str, Any]]
) -> list[SchemaChange]:
    """Every change between two sets of contracts, kind by kind (`common` is shared, not a kind)."""
    changes: list[SchemaChange] = []
    old_kinds = set(old_docs) - {"common"}
    new_kinds = set(new_docs) - {"common"}
    for kind in sorted(old_kinds - new_kinds):
        changes.append(SchemaChange(kind, "", BREAKING, "event kind removed"))
    for kind in sorted(new_kinds - old_kinds):
        changes.append(SchemaChange(kind, "", ADDITIVE, "new event kind"))
    for kind in sorted(old_kinds & new_kinds):
        changes += compare_schemas(kind, old_docs[kind], new_docs[kind], old_docs, new_docs)
    return changes
