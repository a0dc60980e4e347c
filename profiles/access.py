"""API keys with roles: who may read which purpose, audit, or administer.

Keys live in a YAML file (path in TESSERA_API_KEYS or `tessera serve --keys`) holding
only their sha256 hashes, so a leaked config file grants nothing:

    keys:
      - name: web-personalization
        role: reader            # reader | auditor | admin
        purposes: [personalization]
        sha256: 3f1c...
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from profiles.builder import SUBJECT_ACCESS

ROLES = ("reader", "auditor", "admin")
KEYS_ENV = "TESSERA_API_KEYS"


class KeyringError(ValueError):
    """The keys file is not usable; the message lists every problem found."""


@dataclass(frozen=True)
class ApiKey:
    """One configured key: its name, role and the purposes a reader is bound to."""

    name: str
    role: str
    purposes: frozenset[str]
    sha256: str

    def may_read(self, purpose: str) -> bool:
        """Admins read any purpose; readers only those bound to them; auditors none.

        The subject-access view (everything held, consent aside) is for admins only.
        """
        if self.role == "admin":
            return True
        return self.role == "reader" and purpose in self.purposes and purpose != SUBJECT_ACCESS


def hash_key(secret: str) -> str:
    """The stored form of a key: sha256 hex of its text."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    """A fresh random key (what a client sends in the X-API-Key header)."""
    return "tsk_" + secrets.token_urlsafe(24)


class Keyring:
    """The configured keys, found by the hash of the presented secret."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = list(keys)
        # One lookup whatever the number of keys. Matching on the sha256 of the secret, not
        # on the secret, means lookup timing can only reveal bits of a hash the caller
        # cannot steer towards a stored one.
        self._by_hash = {key.sha256: key for key in self.keys}

    def authenticate(self, secret: str | None) -> ApiKey | None:
        """The key a presented secret belongs to, or None when it is missing or unknown."""
        if not secret:
            return None
        return self._by_hash.get(hash_key(secret))


def load_keyring(path: Path | str, purposes: set[str] | None = None) -> Keyring:
    """Read and validate a keys file.

    In: the YAML path and, optionally, the policy's purposes (a reader's must be among
    them). Out: a Keyring. Raises KeyringError listing every problem.
    """
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise KeyringError(f"cannot read API keys {path}: {exc}") from exc
    problems: list[str] = []
    keys: list[ApiKey] = []
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise KeyringError(f"{path}: `keys` must be a list")
    for n, entry in enumerate(entries):
        entry = entry if isinstance(entry, dict) else {}
        name = str(entry.get("name") or f"keys[{n}]")
        role = entry.get("role")
        bound = entry.get("purposes") or []
        digest = str(entry.get("sha256") or "")
        if role not in ROLES:
            problems.append(f"{name}: role must be one of {ROLES}")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            problems.append(f"{name}: sha256 must be 64 lowercase hex characters")
        if not isinstance(bound, list):
            problems.append(f"{name}: purposes must be a list")
            bound = []
        if role == "reader" and not bound:
            problems.append(f"{name}: a reader must be bound to at least one purpose")
        for purpose in bound:
            if purposes is not None and purpose not in purposes:
                problems.append(f"{name}: unknown purpose {purpose!r}")
        keys.append(ApiKey(name, str(role), frozenset(map(str, bound)), digest))
    if problems:
        raise KeyringError("invalid API keys:\n  - " + "\n  - ".join(problems))
    return Keyring(keys)


def write_keyring(path: Path | str, specs: list[dict[str, Any]]) -> dict[str, str]:
    """Create a keys file with fresh keys (for a local stack, the demo and tests).

    In: path and one {name, role, purposes?} per key. Out: name -> secret; only the
    hashes are written.
    """
    secrets_by_name: dict[str, str] = {}
    entries = []
    for spec in specs:
        secret = new_secret()
        secrets_by_name[spec["name"]] = secret
        entries.append({**spec, "sha256": hash_key(secret)})
    Path(path).write_text(yaml.safe_dump({"keys": entries}, sort_keys=False))
    os.chmod(path, 0o600)
    return secrets_by_name


def configured_keyring(path: Path | str | None, purposes: set[str] | None = None) -> Keyring:
    """The keyring at `path`, else at $TESSERA_API_KEYS, else an empty one (every call 401)."""
    path = path or os.environ.get(KEYS_ENV)
    return load_keyring(path, purposes) if path else Keyring([])
