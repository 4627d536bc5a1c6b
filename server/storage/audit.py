"""The audit log: every admin mutation, append-only and hash-chained.

Each entry's hash is SHA-256 over the previous entry's hash and this entry's own fields (its sequence number
included), so editing, deleting or reordering rows breaks the chain from that point on; `verify` names the
first entry where it breaks. Secrets never enter an entry: fields that hold them are replaced by a marker.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from server.storage.models import AuditEntry

GENESIS = "0" * 64
# Keys of admin objects that carry a secret shown once (API keys, enrollment tokens, node credentials).
SECRET_FIELDS = frozenset({"key", "token", "credential"})
REDACTED = "[redacted]"


def redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: REDACTED if k in SECRET_FIELDS else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def _dump(value: Any) -> str:
    return "" if value is None else json.dumps(redact(value), sort_keys=True, default=str)


def entry_hash(entry: AuditEntry) -> str:
    fields = [
        str(entry.id),
        entry.created_at.isoformat(),
        entry.actor,
        entry.action,
        entry.target,
        entry.before,
        entry.after,
        entry.request_id,
        entry.prev_hash,
    ]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


@dataclass(frozen=True)
class Verdict:
    ok: bool
    entries: int
    first_broken: int | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "entries": self.entries, "first_broken": self.first_broken, "reason": self.reason}


class AuditLog:
    """Appends run under the plane's admin lock, so the chain stays a line."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def append(self, *, actor: str, action: str, target: str, before: Any, after: Any, request_id: str) -> AuditEntry:
        with Session(self.engine) as session:
            last = session.exec(select(AuditEntry).order_by(col(AuditEntry.id).desc()).limit(1)).first()
            entry = AuditEntry(
                actor=actor,
                action=action,
                target=target,
                before=_dump(before),
                after=_dump(after),
                request_id=request_id,
                prev_hash=last.hash if last else GENESIS,
                hash="",
            )
            session.add(entry)
            session.flush()  # assigns the sequence number the hash covers
            entry.hash = entry_hash(entry)
            session.commit()
            session.refresh(entry)
            return entry

    def list(self, since: datetime | None = None) -> list[dict[str, Any]]:
        with Session(self.engine) as session:
            query = select(AuditEntry).order_by(col(AuditEntry.id))
            if since is not None:
                query = query.where(col(AuditEntry.created_at) >= since)
            return [_entry_dict(e) for e in session.exec(query)]

    def verify(self) -> Verdict:
        with Session(self.engine) as session:
            entries = list(session.exec(select(AuditEntry).order_by(col(AuditEntry.id))))
        previous = GENESIS
        for entry in entries:
            if entry.prev_hash != previous:
                return Verdict(False, len(entries), entry.id, "its link to the previous entry does not match")
            if entry_hash(entry) != entry.hash:
                return Verdict(False, len(entries), entry.id, "its content does not match its hash")
            previous = entry.hash
        return Verdict(True, len(entries))


def _entry_dict(entry: AuditEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "object": "audit_entry",
        "created_at": entry.created_at.isoformat(),
        "actor": entry.actor,
        "action": entry.action,
        "target": entry.target,
        "before": json.loads(entry.before) if entry.before else None,
        "after": json.loads(entry.after) if entry.after else None,
        "request_id": entry.request_id,
        "hash": entry.hash,
    }
