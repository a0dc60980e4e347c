"""Per-subject keys for crypto-shredding: PII written to immutable topics is sealed with a
key linked to its subjects (identifier hashes, person ids); erasure deletes the keys, and
every copy of the sealed bytes, on any broker or backup, becomes unreadable at once.

The store is a SQLite file (WAL: one writer and many readers across processes), shared by
the worker, the API replica and the producing CLI through `TESSERA_KEY_STORE`. In production
the same interface sits on a KMS or Vault transit keys; the key bytes never leave it there.

Sealed bytes: `tsk1.` + key id + `.` + urlsafe-base64(nonce + AES-256-GCM ciphertext). The
nonce is an HMAC of the plaintext under the key, so sealing is deterministic: re-sending the
same event gives the same bytes, and replays stay recognisable as replays.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from identity.normalise import Identifier, extract_identifiers, identifier_hash

KEY_STORE_ENV = "TESSERA_KEY_STORE"
SEALED_PREFIX = b"tsk1."

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS subject_keys (key_id TEXT PRIMARY KEY, key BLOB NOT NULL, created_at TEXT);
CREATE TABLE IF NOT EXISTS key_subjects (
    key_id TEXT NOT NULL, subject TEXT NOT NULL, PRIMARY KEY (subject, key_id)
);
"""


def key_id_of(subjects: Iterable[str]) -> str:
    """The id of the key for a set of subjects: the same set always gets the same key."""
    body = "\x1f".join(sorted(set(subjects)))
    return hashlib.blake2b(body.encode(), digest_size=12).hexdigest()


class SubjectKeyStore:
    """Data keys by subject set in a SQLite file; `shred` deletes every key of a subject."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._local = threading.local()
        # Keys this process sealed with, so sealing a batch costs no lookups; dropped on shred.
        self._cache: dict[str, bytes] = {}
        self._conn().executescript(SCHEMA_SQL)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA secure_delete=ON")  # a deleted key is overwritten, not freed
            self._local.conn = conn
        return conn

    def key_for(self, subjects: Iterable[str]) -> tuple[str, bytes]:
        """The key of a subject set, created (with its subject links) on first use."""
        subjects = list(subjects)
        key_id = key_id_of(subjects)
        if key_id not in self._cache:
            self.prepare([subjects])
        return key_id, self._cache[key_id]

    def prepare(self, subject_sets: Iterable[Iterable[str]]) -> None:
        """Create the keys of many subject sets in one transaction (a batch's worth)."""
        wanted: dict[str, list[str]] = {}
        for subjects in subject_sets:
            ordered = sorted(set(subjects))
            key_id = key_id_of(ordered)
            if key_id not in self._cache:
                wanted[key_id] = ordered
        if not wanted:
            return
        now = datetime.now(UTC).isoformat()
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT OR IGNORE INTO subject_keys VALUES (?, ?, ?)",
                [(key_id, secrets.token_bytes(32), now) for key_id in wanted],
            )
            conn.executemany(
                "INSERT OR IGNORE INTO key_subjects VALUES (?, ?)",
                [(key_id, s) for key_id, subjects in wanted.items() for s in subjects],
            )
            marks = ",".join("?" * len(wanted))
            rows = conn.execute(
                f"SELECT key_id, key FROM subject_keys WHERE key_id IN ({marks})", list(wanted)
            ).fetchall()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._cache.update(dict(rows))

    def get(self, key_id: str) -> bytes | None:
        """A key by id, or None when it was shredded (or never existed).

        Read from the store each time: another process may have shredded it since.
        """
        row = self._conn().execute("SELECT key FROM subject_keys WHERE key_id = ?", [key_id])
        found = row.fetchone()
        return found[0] if found else None

    def shred(self, subjects: Iterable[str]) -> int:
        """Delete every key linked to any of `subjects`. Out: how many keys were deleted."""
        wanted = sorted(set(subjects))
        if not wanted:
            return 0
        conn = self._conn()
        marks = ",".join("?" * len(wanted))
        conn.execute("BEGIN IMMEDIATE")
        try:
            key_ids = [
                r[0]
                for r in conn.execute(
                    f"SELECT DISTINCT key_id FROM key_subjects WHERE subject IN ({marks})", wanted
                ).fetchall()
            ]
            id_marks = ",".join("?" * len(key_ids))
            deleted = 0
            if key_ids:
                deleted = conn.execute(
                    f"DELETE FROM subject_keys WHERE key_id IN ({id_marks})", key_ids
                ).rowcount
                conn.execute(f"DELETE FROM key_subjects WHERE key_id IN ({id_marks})", key_ids)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._cache.clear()
        # Old copies of the pages live on in the write-ahead log until it is checkpointed.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return deleted

    # -- sealing -----------------------------------------------------------------------------

    def seal(self, plaintext: bytes, subjects: Iterable[str]) -> bytes:
        """`plaintext` sealed under the key of `subjects` (deterministic for equal input)."""
        key_id, key = self.key_for(subjects)
        nonce = hmac.new(key, plaintext, hashlib.sha256).digest()[:12]
        body = nonce + AESGCM(key).encrypt(nonce, plaintext, key_id.encode())
        return SEALED_PREFIX + key_id.encode() + b"." + base64.urlsafe_b64encode(body)

    def seal_event(self, raw: bytes) -> bytes:
        """A raw event sealed for the subjects it names; bytes that name nobody (garbage,
        no identifier) stay as they are, since no erasure could ever find them."""
        return self.seal_events([raw])[0]

    def seal_events(self, raws: list[bytes]) -> list[bytes]:
        """`seal_event` over a batch, creating the batch's new keys in one transaction."""
        subjects = [[] if is_sealed(raw) else event_subjects(raw) for raw in raws]
        self.prepare(s for s in subjects if s)
        return [self.seal(raw, s) if s else raw for raw, s in zip(raws, subjects, strict=True)]

    def open(self, data: bytes) -> bytes | None:
        """The plaintext of sealed bytes; unsealed bytes as they are; None when the key is gone."""
        if not is_sealed(data):
            return data
        try:
            key_id, body = data[len(SEALED_PREFIX) :].split(b".", 1)
            raw = base64.urlsafe_b64decode(body)
        except ValueError:
            return None
        key = self.get(key_id.decode("ascii", "replace"))
        if key is None:
            return None
        try:
            return AESGCM(key).decrypt(raw[:12], raw[12:], key_id)
        except InvalidTag:
            return None


def is_sealed(data: bytes | None) -> bool:
    """True for bytes sealed by a SubjectKeyStore."""
    return bool(data) and data.startswith(SEALED_PREFIX)  # type: ignore[union-attr]


def configured_key_store(path: Path | str | None = None) -> SubjectKeyStore | None:
    """The key store at `path`, else at $TESSERA_KEY_STORE, else None (nothing is sealed)."""
    path = path or os.environ.get(KEY_STORE_ENV)
    return SubjectKeyStore(path) if path else None


def profile_subjects(doc: dict) -> list[str]:
    """The subjects a profile document is sealed for: its person and every identifier."""
    subjects = [str(doc.get("person_id"))]
    for id_type, values in (doc.get("identifiers") or {}).items():
        subjects += [identifier_hash(Identifier(id_type, v)) for v in values]
    return subjects


def event_subjects(raw: bytes) -> list[str]:
    """Identifier hashes of the subjects a raw event names ([] when it names nobody)."""
    with contextlib.suppress(orjson.JSONDecodeError):
        event = orjson.loads(raw)
        if isinstance(event, dict):
            # Rejected events can hold any shape; what cannot be read names nobody.
            with contextlib.suppress(TypeError, ValueError, AttributeError):
                return [identifier_hash(i) for i in extract_identifiers(event)]
    return []
