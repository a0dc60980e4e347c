"""Privacy requests over a micro-batch: each gets exactly one outcome and, when valid, a
certificate chained into the lineage ledger.

A malformed request is rejected with a reason (dead-lettered like any bad input); a valid
one is carried out (an unknown identifier gives a certificate that found nothing); a
replayed one is a duplicate and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from consent.erasure import ErasureRequest, SubjectEraser, parse_request
from consent.gate import ALLOWED, GateDecision
from consent.ledger import LedgerEntry, LineageLedger
from identity.resolver import Resolution
from quality.reasons import ReasonCode
from schemas.contract import ContractResult, Reason

REQUEST_KIND = "privacy_request"


@dataclass
class RequestItem:
    """One request's outcome, as the pipeline records outcomes."""

    record: Any  # the consumed record, as the engine gave it
    contract: ContractResult
    payload_hash: str
    key: str
    decision: GateDecision


@dataclass
class ErasureBatch:
    """What a batch's requests did: outcomes, identity changes, persons to rebuild, and
    (after `certify`) the certificates to publish as (key, value)."""

    items: list[RequestItem] = field(default_factory=list)
    resolutions: list[Resolution] = field(default_factory=list)
    persons: set[str] = field(default_factory=set)
    duplicates: int = 0
    certificates: list[tuple[bytes, bytes]] = field(default_factory=list)


class PrivacyRequests:
    """Carries out a batch's erasure requests with a SubjectEraser."""

    def __init__(self, eraser: SubjectEraser) -> None:
        self.eraser = eraser
        self._pending: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        self._batch = ErasureBatch()

    def erase(
        self,
        records: Sequence[Any],
        key_of: Callable[[bytes], str],
        known: Callable[[str], bool],
    ) -> ErasureBatch:
        """Parse and carry out requests in order.

        In: consumed records (with `.value`), the payload hash function, and whether an
        outcome key is already recorded. Out: the batch's ErasureBatch; `certify` then
        chains the certificates into the ledger.
        """
        batch = ErasureBatch()
        self._pending = []
        self._batch = batch
        seen: set[str] = set()
        for record in records:
            raw = record.value or b""
            digest = key_of(raw)
            request = parse_request(raw)
            key = (
                f"erasure:{request.request_id}"
                if isinstance(request, ErasureRequest)
                else f"raw:{digest}"
            )
            if key in seen or known(key):
                batch.duplicates += 1
                continue
            seen.add(key)
            contract = ContractResult(kind=REQUEST_KIND, version=1)
            if isinstance(request, ErasureRequest):
                result = self.eraser.erase(request, key)
                batch.resolutions += result.resolutions
                batch.persons |= result.erased_persons | result.touched
                source = {
                    "topic": getattr(record, "topic", None),
                    "partition": getattr(record, "partition", None),
                    "offset": getattr(record, "offset", None),
                }
                self._pending.append((key, result.certificate, source))
            else:
                contract.reasons.append(Reason(ReasonCode.INVALID_PRIVACY_REQUEST, request))
            decision = GateDecision(ALLOWED, None, "privacy-request", None, None)
            batch.items.append(RequestItem(record, contract, digest, key, decision))
        return batch

    def certify(self, ledger: LineageLedger) -> list[LedgerEntry]:
        """Chain one ledger entry per erasure and finish its certificate with that entry's hash."""
        entries = ledger.append(
            [
                {
                    "event_key": key,
                    "kind": "erasure",
                    "source": source,
                    "decision": "erased",
                    "request_id": cert["request_id"],
                    "subject": cert["subject"],
                    "requested_at": cert["requested_at"],
                    "persons_erased": cert["persons_erased"],
                    "persons_split_off": cert["persons_split_off"],
                    "erased": cert["erased"],
                }
                for key, cert, source in self._pending
            ]
        )
        for entry, (_, cert, _) in zip(entries, self._pending, strict=True):
            cert["ledger"] = {"seq": entry.seq, "hash": entry.hash}
            self.eraser.record(cert)
            self._batch.certificates.append(
                (cert["request_id"].encode(), orjson.dumps(cert, option=orjson.OPT_SORT_KEYS))
            )
        self._pending = []
        return entries
