"""Accounts, sessions, invitations and scoped admin tokens in the database. Synchronous, like server.storage:
the HTTP layer runs these in a worker thread. Every secret (session id, invitation token, admin token) is stored
as its SHA-256 only (server.credentials.hash_key); passwords as argon2id hashes (server.accounts.passwords)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, delete, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from server.accounts.roles import PLANE_ADMIN, ROLES
from server.credentials import API_KEY_PREFIX, DISPLAY_PREFIX_LEN, generate_key, hash_key
from server.errors import ConflictError, InvalidRequestError, NotFoundError
from server.storage.models import (
    Account,
    AccountSession,
    AdminToken,
    ApiKey,
    Invitation,
    Org,
    iso,
    utcnow,
)
from server.storage.store import find_org, org_dict

# Enough to catch a typo or a name where an address belongs; whether mail arrives is not the plane's concern.
# Any script may be in it (an internationalised address is one); no control character may.
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,190}$")
# The console key's name in listings: it is the account's, made on first use of the playground.
CONSOLE_KEY_NAME = "console playground"
# One message for unknown, used and expired invitations: which it was helps nobody holding a stolen link.
INVALID_INVITATION = "this invitation is invalid, used or expired"


def normalize_email(value: object) -> str:
    email = value.strip().lower() if isinstance(value, str) else ""
    if not _EMAIL.match(email) or not email.isprintable():
        raise InvalidRequestError("'email' must be an email address", param="email")
    return email


@dataclass(frozen=True)
class Identity:
    """Who a credential stands for, as a principal is built from it."""

    account_id: str | None
    email: str | None
    name: str | None
    role: str
    org_id: str | None


class AccountStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- accounts ---------------------------------------------------------------------------------

    def resolve_org(self, role: str, org_ref: str | None) -> str | None:
        """The org id an account or token of `role` belongs to: none for a plane admin, one for every other."""
        if role not in ROLES:
            raise InvalidRequestError(f"'role' must be one of {', '.join(ROLES)}", param="role")
        if role == PLANE_ADMIN:
            if org_ref:
                raise InvalidRequestError("a plane admin belongs to no org: leave 'org_id' out", param="org_id")
            return None
        if not org_ref:
            raise InvalidRequestError(f"a {role} belongs to an org: pass 'org_id'", param="org_id")
        with Session(self.engine) as session:
            return find_org(session, org_ref).id

    def create_account(
        self, email: str, name: str, role: str, org_id: str | None, password_hash: str
    ) -> dict[str, Any]:
        with Session(self.engine) as session:
            if session.exec(select(Account).where(Account.email == email)).first() is not None:
                raise ConflictError(f"an account for {email!r} exists already", param="email")
            account = Account(email=email, name=name, role=role, org_id=org_id, password_hash=password_hash)
            session.add(account)
            _commit_account(session, email)
            return self._account_dict(session, account)

    def list_accounts(self, org_id: str | None = None) -> list[dict[str, Any]]:
        with Session(self.engine) as session:
            query = select(Account).order_by(col(Account.created_at))
            if org_id is not None:
                query = query.where(Account.org_id == org_id)
            return [self._account_dict(session, a) for a in session.exec(query)]

    def get_account(self, account_id: str) -> dict[str, Any]:
        with Session(self.engine) as session:
            return self._account_dict(session, self._find(session, account_id))

    def update_account(
        self,
        account_id: str,
        *,
        name: str | None = None,
        role: str | None = None,
        org_id: str | None = None,
        disabled: bool | None = None,
        password_hash: str | None = None,
    ) -> dict[str, Any]:
        """Change what is given. Disabling, a new role or a new password ends the account's sessions: whoever
        signed in before must sign in again under what holds now."""
        with Session(self.engine) as session:
            account = self._find(session, account_id)
            if name is not None:
                account.name = name
            if role is not None:
                account.role, account.org_id = role, org_id
            if disabled is not None:
                account.disabled = disabled
            if password_hash is not None:
                account.password_hash = password_hash
            if disabled or role is not None or password_hash is not None:
                session.exec(delete(AccountSession).where(col(AccountSession.account_id) == account.id))
            session.add(account)
            session.commit()
            return self._account_dict(session, account)

    def remove_account(self, account_id: str) -> dict[str, Any]:
        """Delete the account and its sessions, revoke its admin tokens and its console keys. Keys and nodes it
        owned stay with its org (an org admin still sees them)."""
        now = utcnow()
        with Session(self.engine) as session:
            account = self._find(session, account_id)
            result = self._account_dict(session, account)
            session.exec(delete(AccountSession).where(col(AccountSession.account_id) == account.id))
            session.exec(
                update(AdminToken)
                .where(col(AdminToken.account_id) == account.id, col(AdminToken.revoked_at).is_(None))
                .values(revoked_at=now)
            )
            session.exec(
                update(ApiKey)
                .where(
                    col(ApiKey.owner_account_id) == account.id, col(ApiKey.console), col(ApiKey.revoked_at).is_(None)
                )
                .values(revoked_at=now)
            )
            session.delete(account)
            session.commit()
            return result

    def password_of(self, email: str) -> tuple[str, str] | None:
        """(account id, password hash) of an enabled account; None for an unknown or disabled one (the caller
        tells nobody which)."""
        with Session(self.engine) as session:
            account = session.exec(select(Account).where(Account.email == email)).first()
            if account is None or account.disabled:
                return None
            return account.id, account.password_hash

    @staticmethod
    def _find(session: Session, account_id: str) -> Account:
        account = session.get(Account, account_id)
        if account is None:
            raise NotFoundError(f"no account {account_id!r}", param="id")
        return account

    @staticmethod
    def _account_dict(session: Session, account: Account) -> dict[str, Any]:
        org = session.get(Org, account.org_id) if account.org_id else None
        return {
            "id": account.id,
            "object": "account",
            "email": account.email,
            "name": account.name,
            "role": account.role,
            "org_id": account.org_id,
            "org": org.name if org is not None else None,
            "disabled": account.disabled,
            "created_at": iso(account.created_at),
        }

    # -- sessions ---------------------------------------------------------------------------------

    def start_session(self, account_id: str, id_hash: str, expires_at: datetime) -> None:
        with Session(self.engine) as session:
            # Sessions that ran out are removed here, where sessions are made, rather than by a timer.
            session.exec(delete(AccountSession).where(col(AccountSession.expires_at) <= utcnow()))
            session.add(AccountSession(id_hash=id_hash, account_id=account_id, expires_at=expires_at))
            session.commit()

    def session_identity(self, id_hash: str) -> Identity | None:
        """Whose live session this is; None for an unknown, expired or ended one, or a disabled account."""
        with Session(self.engine) as session:
            found = session.exec(
                select(Account)
                .join(AccountSession)
                .where(
                    AccountSession.id_hash == id_hash,
                    col(AccountSession.expires_at) > utcnow(),
                    col(Account.disabled).is_(False),
                )
            ).first()
            return _identity(found) if found is not None else None

    def end_session(self, id_hash: str) -> None:
        with Session(self.engine) as session:
            session.exec(delete(AccountSession).where(col(AccountSession.id_hash) == id_hash))
            session.commit()

    # -- invitations ------------------------------------------------------------------------------

    def create_invitation(
        self, email: str, role: str, org_id: str | None, created_by: str, token_hash: str, expires_at: datetime
    ) -> dict[str, Any]:
        with Session(self.engine) as session:
            if session.exec(select(Account).where(Account.email == email)).first() is not None:
                raise ConflictError(f"an account for {email!r} exists already", param="email")
            row = Invitation(
                token_hash=token_hash,
                email=email,
                role=role,
                org_id=org_id,
                created_by=created_by,
                expires_at=expires_at,
            )
            session.add(row)
            session.commit()
            return {
                "id": row.id,
                "object": "invitation",
                "email": email,
                "role": role,
                "org_id": org_id,
                "expires_at": iso(row.expires_at),
                "created_at": iso(row.created_at),
            }

    def invitation_open(self, token_hash: str) -> bool:
        """Whether an invitation with this token may still be accepted (read only: checked before the costly
        password hash, so that a made-up token costs the plane one SELECT)."""
        with Session(self.engine) as session:
            row = session.exec(
                select(Invitation).where(
                    col(Invitation.token_hash) == token_hash,
                    col(Invitation.used_at).is_(None),
                    col(Invitation.expires_at) > utcnow(),
                )
            ).first()
            return row is not None

    def accept_invitation(self, token_hash: str, name: str, password_hash: str) -> dict[str, Any]:
        """Spend the invitation (once: one statement checks and marks it) and create its account."""
        now = utcnow()
        with Session(self.engine) as session:
            row = session.exec(select(Invitation).where(Invitation.token_hash == token_hash)).first()
            spent = session.exec(
                update(Invitation)
                .where(
                    col(Invitation.token_hash) == token_hash,
                    col(Invitation.used_at).is_(None),
                    col(Invitation.expires_at) > now,
                )
                .values(used_at=now)
            )
            if row is None or spent.rowcount != 1:
                raise InvalidRequestError(INVALID_INVITATION, param="token", code="invalid_invitation")
            if session.exec(select(Account).where(Account.email == row.email)).first() is not None:
                raise ConflictError(f"an account for {row.email!r} exists already", param="token")
            account = Account(email=row.email, name=name, role=row.role, org_id=row.org_id, password_hash=password_hash)
            session.add(account)
            _commit_account(session, row.email)
            return self._account_dict(session, account)

    # -- scoped admin tokens ----------------------------------------------------------------------

    def create_token(
        self,
        name: str,
        role: str,
        org_id: str | None,
        account_id: str | None,
        created_by: str,
        expires_at: datetime | None,
        token_hash: str,
    ) -> dict[str, Any]:
        if expires_at is not None and expires_at <= utcnow():
            raise InvalidRequestError("expires_at is in the past", param="expires_at")
        with Session(self.engine) as session:
            if account_id is not None:
                account = self._find(session, account_id)
                if account.org_id != org_id:
                    raise InvalidRequestError("the token's account is not in the token's org", param="account_id")
            row = AdminToken(
                name=name,
                token_hash=token_hash,
                role=role,
                org_id=org_id,
                account_id=account_id,
                created_by=created_by,
                expires_at=expires_at,
            )
            session.add(row)
            session.commit()
            return _token_dict(row)

    def list_tokens(self, org_id: str | None = None) -> list[dict[str, Any]]:
        with Session(self.engine) as session:
            query = select(AdminToken).order_by(col(AdminToken.created_at))
            if org_id is not None:
                query = query.where(AdminToken.org_id == org_id)
            return [_token_dict(t) for t in session.exec(query)]

    def get_token(self, token_id: str) -> dict[str, Any]:
        with Session(self.engine) as session:
            row = session.get(AdminToken, token_id)
            if row is None:
                raise NotFoundError(f"no admin token {token_id!r}", param="id")
            return _token_dict(row)

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        with Session(self.engine) as session:
            row = session.get(AdminToken, token_id)
            if row is None:
                raise NotFoundError(f"no admin token {token_id!r}", param="id")
            row.revoked_at = row.revoked_at or utcnow()
            session.add(row)
            session.commit()
            return _token_dict(row)

    def token_identity(self, token_hash: str) -> tuple[str, Identity] | None:
        """(token id, whom it stands for) of a valid token: not revoked, not expired, and its account (if it acts
        for one) still enabled."""
        with Session(self.engine) as session:
            row = session.exec(select(AdminToken).where(AdminToken.token_hash == token_hash)).first()
            if row is None or row.revoked_at is not None:
                return None
            if row.expires_at is not None and row.expires_at <= utcnow():
                return None
            account = session.get(Account, row.account_id) if row.account_id else None
            if row.account_id and (account is None or account.disabled):
                return None
            identity = Identity(
                account_id=row.account_id,
                email=account.email if account else None,
                name=row.name,
                role=row.role,
                org_id=row.org_id,
            )
            return row.id, identity

    # -- ownership --------------------------------------------------------------------------------

    def console_key(self, account_id: str, org_id: str, create: bool) -> tuple[str, dict[str, Any] | None]:
        """The hash of the account's console key in `org_id`, and the key when it was made just now (the caller
        audits it and reloads the snapshot); with `create` False, ("", None) when there is none yet. Its secret
        is thrown away at once: only the session ever uses the key."""
        with Session(self.engine) as session:
            row = session.exec(
                select(ApiKey).where(
                    ApiKey.owner_account_id == account_id,
                    ApiKey.org_id == org_id,
                    col(ApiKey.console),
                    col(ApiKey.revoked_at).is_(None),
                )
            ).first()
            if row is not None or not create:
                return (row.key_hash if row is not None else ""), None
            secret = generate_key(API_KEY_PREFIX)
            row = ApiKey(
                org_id=org_id,
                name=CONSOLE_KEY_NAME,
                prefix=secret[:DISPLAY_PREFIX_LEN],
                key_hash=hash_key(secret),
                owner_account_id=account_id,
                console=True,
            )
            session.add(row)
            session.commit()
            created = {
                "id": row.id,
                "object": "api_key",
                "org_id": org_id,
                "name": row.name,
                "prefix": row.prefix,
                "owner_account_id": account_id,
                "console": True,
                "created_at": iso(row.created_at),
            }
            return row.key_hash, created

    def org_actors(self, org_id: str) -> set[str]:
        """The audit actors that belong to an org: its accounts and its scoped tokens."""
        with Session(self.engine) as session:
            accounts = session.exec(select(Account.id).where(Account.org_id == org_id))
            tokens = session.exec(select(AdminToken.id).where(AdminToken.org_id == org_id))
            return {*accounts, *tokens}

    def owned_key_ids(self, account_id: str) -> list[str]:
        with Session(self.engine) as session:
            return list(session.exec(select(ApiKey.id).where(ApiKey.owner_account_id == account_id)))

    def set_providers_may_enroll(self, org_ref: str, allowed: bool) -> dict[str, Any]:
        with Session(self.engine) as session:
            org = find_org(session, org_ref)
            org.providers_may_enroll = allowed
            session.add(org)
            session.commit()
            return org_dict(org)

    def providers_may_enroll(self, org_id: str) -> bool:
        with Session(self.engine) as session:
            org = session.get(Org, org_id)
            return bool(org is not None and org.providers_may_enroll)


def _commit_account(session: Session, email: str) -> None:
    """Commit a new account; one made for the same email meanwhile (checked above, raced since) is a 409."""
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise ConflictError(f"an account for {email!r} exists already", param="email") from None


def _identity(account: Account) -> Identity:
    return Identity(account.id, account.email, account.name, account.role, account.org_id)


def _token_dict(row: AdminToken) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "admin_token",
        "name": row.name,
        "role": row.role,
        "org_id": row.org_id,
        "account_id": row.account_id,
        "created_by": row.created_by,
        "expires_at": iso(row.expires_at),
        "revoked_at": iso(row.revoked_at),
        "created_at": iso(row.created_at),
    }
