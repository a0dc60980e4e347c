"""The purpose policy: which purpose each event kind serves and what silence means per jurisdiction.

Loaded from YAML and validated at start; a bad policy fails with every problem listed,
never halfway through a stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_POLICY_PATH = Path(__file__).with_name("policy.yaml")
STATUSES = ("granted", "denied", "withdrawn")


class PolicyError(ValueError):
    """The policy file is not usable; the message lists every problem found."""


@dataclass(frozen=True)
class Jurisdiction:
    name: str
    countries: frozenset[str]
    defaults: dict[str, str]


@dataclass(frozen=True)
class PurposePolicy:
    """A validated purpose policy."""

    version: str
    purposes: dict[str, str]
    event_purposes: dict[str, str | None]
    jurisdictions: dict[str, Jurisdiction]
    # Country code -> the first jurisdiction naming it: asked once per event by the gate
    # and the profile builder, so a lookup rather than a walk over every jurisdiction.
    _by_country: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_country: dict[str, str] = {}
        for jurisdiction in self.jurisdictions.values():
            for code in jurisdiction.countries:
                by_country.setdefault(code, jurisdiction.name)
        object.__setattr__(self, "_by_country", by_country)

    def purpose_for(self, kind: str) -> str | None:
        """The purpose an event kind is ingested for; None when it needs no consent."""
        return self.event_purposes.get(kind)

    def jurisdiction_of(self, country: str | None) -> str:
        """The jurisdiction whose defaults apply to a country code (`default` when unknown)."""
        if country:
            return self._by_country.get(country.strip().upper(), "default")
        return "default"

    def default_status(self, jurisdiction: str, purpose: str) -> str:
        """What a subject who has said nothing has agreed to for `purpose`."""
        rules = self.jurisdictions.get(jurisdiction) or self.jurisdictions["default"]
        return rules.defaults.get(purpose, "denied")


def _validate(doc: Any, known_kinds: set[str] | None) -> PurposePolicy:
    problems: list[str] = []
    if not isinstance(doc, dict):
        raise PolicyError("policy must be a YAML mapping with version, purposes, events")
    purposes = doc.get("purposes")
    if not isinstance(purposes, dict) or not purposes:
        problems.append("`purposes` must be a non-empty mapping of purpose name to description")
        purposes = {}
    events = doc.get("events")
    if not isinstance(events, dict):
        problems.append("`events` must map each event kind to a purpose or null")
        events = {}
    for kind, purpose in events.items():
        if purpose is not None and purpose not in purposes:
            problems.append(f"events.{kind}: unknown purpose {purpose!r}")
        if known_kinds is not None and kind not in known_kinds:
            problems.append(f"events.{kind}: no contract of that kind in schemas/")
    if known_kinds is not None:
        for kind in sorted(known_kinds - set(events)):
            problems.append(f"events.{kind}: missing (say which purpose it needs, or null)")
    jurisdictions: dict[str, Jurisdiction] = {}
    raw_jurisdictions = doc.get("jurisdictions")
    if not isinstance(raw_jurisdictions, dict) or "default" not in raw_jurisdictions:
        problems.append("`jurisdictions` must be a mapping that includes `default`")
        raw_jurisdictions = {}
    for name, spec in raw_jurisdictions.items():
        spec = spec if isinstance(spec, dict) else {}
        defaults = spec.get("defaults")
        if not isinstance(defaults, dict):
            problems.append(f"jurisdictions.{name}.defaults must be a mapping")
            defaults = {}
        for purpose, status in defaults.items():
            if purpose not in purposes:
                problems.append(f"jurisdictions.{name}.defaults: unknown purpose {purpose!r}")
            if status not in STATUSES:
                problems.append(
                    f"jurisdictions.{name}.defaults.{purpose}: {status!r} is not one of {STATUSES}"
                )
        countries = spec.get("countries", [])
        if not isinstance(countries, list):
            problems.append(f"jurisdictions.{name}.countries must be a list")
            countries = []
        codes = frozenset(str(c).upper() for c in countries)
        jurisdictions[str(name)] = Jurisdiction(str(name), codes, dict(defaults))
    if problems:
        raise PolicyError("invalid purpose policy:\n  - " + "\n  - ".join(problems))
    return PurposePolicy(
        version=str(doc.get("version", "unversioned")),
        purposes={str(k): str(v) for k, v in purposes.items()},
        event_purposes=dict(events),
        jurisdictions=jurisdictions,
    )


def load_policy(
    path: Path | str = DEFAULT_POLICY_PATH, known_kinds: set[str] | None = None
) -> PurposePolicy:
    """Read and validate a purpose policy YAML file.

    In: the file path and, optionally, the event kinds that have contracts (each must
    be named). Out: a PurposePolicy. Raises PolicyError listing every problem.
    """
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"cannot read purpose policy {path}: {exc}") from exc
    return _validate(doc, known_kinds)
