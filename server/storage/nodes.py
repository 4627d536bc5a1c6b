"""Admin operations for nodes: enrollment tokens, enrolling, listing, draining and revoking nodes.

Tokens and credentials are bearer secrets; only their SHA-256 hashes are stored (see server.credentials).

Who may take an existing node's id: a token lets a machine join an org, not become one of its nodes. A token
enrolls a new node unless the agent proves it is an existing one, by sending that node's current credential
(`previous_credential`, from its config file), or the token itself names the node (an admin's `--replace NODE`,
for a machine that lost its config or a new machine in an old one's place). The machine id an agent reports is
recorded but proves nothing: any agent can send any value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, update
from sqlmodel import Session, col, select

from server.credentials import NODE_CREDENTIAL_PREFIX, generate_key, hash_key
from server.errors import InvalidRequestError, NotFoundError
from server.storage.models import EnrollmentToken, Node, Org, iso, utcnow
from server.storage.store import find_org


class EnrollmentRefused(Exception):
    """The token is unknown, expired, used up or revoked (one message for all, on purpose)."""


@dataclass(frozen=True)
class Enrolled:
    node: dict[str, Any]
    credential: str
    # An existing node was enrolled again: its earlier credential no longer works.
    superseded: bool = False


class NodeStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- enrollment tokens ------------------------------------------------------------------------

    def create_token(
        self,
        org_ref: str,
        secret: str,
        *,
        ttl_s: float | None,
        uses: int,
        labels: dict[str, str],
        replace: str | None = None,
        created_by: str | None = None,
    ) -> dict[str, Any]:
        """A token for `org_ref`; with `replace` (a node's id or name), the machine enrolling with it takes over
        that node. `created_by`: the account that made it, which will own the nodes enrolled with it."""
        if uses < 1:
            raise InvalidRequestError("uses must be at least 1", param="uses")
        if ttl_s is not None and ttl_s <= 0:
            raise InvalidRequestError("ttl must be positive", param="ttl_s")
        if replace and uses != 1:
            raise InvalidRequestError("a token that replaces a node enrolls one machine: uses must be 1", param="uses")
        with Session(self.engine) as session:
            org = find_org(session, org_ref)
            replaced = self._find(session, replace)[0] if replace else None
            if replaced is not None and replaced.org_id != org.id:
                raise InvalidRequestError(f"node {replace!r} is not in org {org.name!r}", param="replace")
            row = EnrollmentToken(
                org_id=org.id,
                token_hash=hash_key(secret),
                uses_left=uses,
                expires_at=utcnow() + timedelta(seconds=ttl_s) if ttl_s else None,
                labels=json.dumps(labels) if labels else "",
                replace_node_id=replaced.id if replaced is not None else None,
                created_by=created_by,
            )
            session.add(row)
            session.commit()
            return self._token_dict(row, org)

    def list_tokens(self, org_ref: str | None = None) -> list[dict[str, Any]]:
        with Session(self.engine) as session:
            query = select(EnrollmentToken, Org).join(Org).order_by(col(EnrollmentToken.created_at))
            if org_ref:
                query = query.where(EnrollmentToken.org_id == find_org(session, org_ref).id)
            return [self._token_dict(t, o) for t, o in session.exec(query)]

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        with Session(self.engine) as session:
            row = session.get(EnrollmentToken, token_id)
            if row is None:
                raise NotFoundError(f"no enrollment token {token_id!r}", param="id")
            row.revoked_at = row.revoked_at or utcnow()
            session.add(row)
            session.commit()
            org = session.get(Org, row.org_id)
            assert org is not None
            return self._token_dict(row, org)

    @staticmethod
    def _token_dict(row: EnrollmentToken, org: Org) -> dict[str, Any]:
        return {
            "id": row.id,
            "object": "node_token",
            "org": org.name,
            "org_id": org.id,
            "uses_left": row.uses_left,
            "expires_at": iso(row.expires_at),
            "revoked_at": iso(row.revoked_at),
            "labels": json.loads(row.labels) if row.labels else {},
            "replaces": row.replace_node_id,
            "created_by": row.created_by,
            "created_at": iso(row.created_at),
        }

    # -- enrolling --------------------------------------------------------------------------------

    def enroll(self, secret: str, name: str, machine_id: str, previous_credential: str = "") -> Enrolled:
        """Spend one use of the token. An existing node of the token's org is enrolled again (same id, a new
        credential) when the token replaces it or `previous_credential` is its current one; otherwise a new node."""
        if not machine_id:
            raise EnrollmentRefused("the agent sent no machine id")
        credential = generate_key(NODE_CREDENTIAL_PREFIX)
        with Session(self.engine) as session:
            token = session.exec(select(EnrollmentToken).where(EnrollmentToken.token_hash == hash_key(secret))).first()
            now = utcnow()
            if (
                token is None
                or token.revoked_at is not None
                or (token.expires_at is not None and token.expires_at <= now)
            ):
                raise EnrollmentRefused("enrollment token is invalid, expired or revoked")
            # One statement checks and spends a use, so two agents racing for the last use cannot both win.
            spent = session.exec(
                update(EnrollmentToken)
                .where(col(EnrollmentToken.id) == token.id, col(EnrollmentToken.uses_left) > 0)
                .values(uses_left=EnrollmentToken.uses_left - 1)
            )
            if spent.rowcount != 1:
                raise EnrollmentRefused("enrollment token has been used up")
            existing = self._enrollee(session, token, previous_credential)
            node = existing or Node(org_id=token.org_id, name=name, machine_id=machine_id, credential_hash="")
            node.name = name or node.name
            node.machine_id = machine_id
            node.credential_hash = hash_key(credential)
            node.labels = token.labels
            node.owner_account_id = token.created_by
            node.revoked_at = None
            node.enrolled_at = now
            session.add(node)
            session.commit()
            org = session.get(Org, node.org_id)
            assert org is not None
            return Enrolled(self._node_dict(node, org), credential, superseded=existing is not None)

    @staticmethod
    def _enrollee(session: Session, token: EnrollmentToken, previous_credential: str) -> Node | None:
        """The existing node this enrollment may take over, or None for a new node."""
        if token.replace_node_id:
            replaced = session.get(Node, token.replace_node_id)
            # Revoked or not: the admin asked for this node by name.
            return replaced if replaced is not None and replaced.org_id == token.org_id else None
        if not previous_credential:
            return None
        # A revoked credential proves nothing any more; a credential of another org's node moves no node.
        return session.exec(
            select(Node).where(
                Node.credential_hash == hash_key(previous_credential),
                Node.org_id == token.org_id,
                col(Node.revoked_at).is_(None),
            )
        ).first()

    # -- nodes ------------------------------------------------------------------------------------

    def list_nodes(self, org_ref: str | None = None) -> list[dict[str, Any]]:
        with Session(self.engine) as session:
            query = select(Node, Org).join(Org).order_by(col(Node.created_at))
            if org_ref:
                query = query.where(Node.org_id == find_org(session, org_ref).id)
            return [self._node_dict(n, o) for n, o in session.exec(query)]

    def get_node(self, ref: str) -> dict[str, Any]:
        with Session(self.engine) as session:
            node, org = self._find(session, ref)
            return self._node_dict(node, org)

    def set_drained(self, ref: str, drained: bool) -> dict[str, Any]:
        with Session(self.engine) as session:
            node, org = self._find(session, ref)
            node.drained = drained
            session.add(node)
            session.commit()
            return self._node_dict(node, org)

    def revoke(self, ref: str) -> dict[str, Any]:
        with Session(self.engine) as session:
            node, org = self._find(session, ref)
            node.revoked_at = node.revoked_at or utcnow()
            session.add(node)
            session.commit()
            return self._node_dict(node, org)

    def active_nodes(self) -> list[Node]:
        with Session(self.engine) as session:
            return list(session.exec(select(Node).where(col(Node.revoked_at).is_(None))))

    @staticmethod
    def _find(session: Session, ref: str) -> tuple[Node, Org]:
        found = session.exec(select(Node, Org).join(Org).where((Node.id == ref) | (Node.name == ref))).all()
        if not found:
            raise NotFoundError(f"no node {ref!r}", param="id")
        if len(found) > 1:
            raise InvalidRequestError(f"several nodes are named {ref!r}: use the node id", param="id")
        return found[0]

    @staticmethod
    def _node_dict(node: Node, org: Org) -> dict[str, Any]:
        return {
            "id": node.id,
            "object": "node",
            "org": org.name,
            "org_id": org.id,
            "name": node.name,
            "labels": json.loads(node.labels) if node.labels else {},
            "drained": node.drained,
            "owner_account_id": node.owner_account_id,
            "revoked_at": iso(node.revoked_at),
            "enrolled_at": iso(node.enrolled_at),
            "created_at": iso(node.created_at),
        }
