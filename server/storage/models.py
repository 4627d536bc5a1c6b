"""The tables. Secrets never appear here in clear: API keys as SHA-256 hashes, provider keys Fernet-encrypted."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, UniqueConstraint, false, true
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(value: datetime | None) -> str | None:
    """A timestamp as admin objects show it: ISO 8601, or None."""
    return value.isoformat() if value else None


def split_list(value: str) -> list[str]:
    """Read a comma-separated column (allow-lists, rule targets): empty means an empty list."""
    return value.split(",") if value else []


def server_default(value: str | ColumnElement[bool]) -> dict[str, Any]:
    """The database-side default a migration gave a column it added to existing rows; declared here too so that
    `create_all` (how an empty database gets its schema, see server.storage.db) builds what the migrations build."""
    return {"server_default": value}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


class Org(SQLModel, table=True):
    id: str = Field(primary_key=True, default_factory=lambda: new_id("org"))
    name: str = Field(unique=True, index=True)
    # Response cache policy (server.policy.cache.CACHE_MODES) and how long an answer stays cached.
    cache_mode: str = Field(default="deterministic", sa_column_kwargs=server_default("deterministic"))
    cache_ttl_s: int = Field(default=300, sa_column_kwargs=server_default("300"))
    # Whether its provider accounts may create enrollment tokens themselves (server.accounts.roles).
    providers_may_enroll: bool = Field(default=False, sa_column_kwargs=server_default(false()))
    created_at: datetime = Field(default_factory=utcnow)


class AdminKey(SQLModel, table=True):
    __tablename__ = "admin_key"

    id: str = Field(primary_key=True, default_factory=lambda: new_id("adm"))
    name: str
    key_hash: str = Field(unique=True, index=True)
    created_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_key"

    id: str = Field(primary_key=True, default_factory=lambda: new_id("key"))
    org_id: str = Field(foreign_key="org.id", index=True)
    name: str = ""
    # The first characters of the key, shown in listings so people can tell their keys apart.
    prefix: str
    key_hash: str = Field(unique=True, index=True)
    # Comma-separated allow-list of model names; empty allows every model of the org.
    models: str = ""
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)
    # The account that owns it (a developer sees and revokes only their own keys); None: the org's.
    owner_account_id: str | None = Field(default=None, index=True)
    # The key an account's playground requests run as (server.accounts.playground): made on first use, never shown.
    console: bool = Field(default=False, sa_column_kwargs=server_default(false()))


class Provider(SQLModel, table=True):
    id: str = Field(primary_key=True, default_factory=lambda: new_id("prv"))
    org_id: str = Field(foreign_key="org.id", index=True)
    name: str = Field(index=True)
    base_url: str
    # Monotonic order in which providers were added: the default routing order.
    position: int = Field(default=0, index=True)
    # JSON object of FailoverPolicy overrides (timeouts, retries, breaker); empty uses the plane's defaults.
    policy: str = Field(default="", sa_column_kwargs=server_default(""))
    # How it continues a broken stream for a rescue (server.routing.continuation): regenerate, prefill, vllm or none.
    # Declared by the operator: a provider's answers cannot prove it continues a final assistant message.
    continuation: str = Field(default="regenerate", sa_column_kwargs=server_default("regenerate"))
    # Whether it serves OpenAI's /v1/responses itself: such requests are relayed to it as they are, and
    # translated to chat completions for a provider without it (server.responses). Declared by the operator.
    responses: bool = Field(default=False, sa_column_kwargs=server_default(false()))
    # JSON object of its own egress settings (proxy, ca_file, client_cert, client_key; server.targets.egress); empty
    # uses the plane's. A proxy URL with credentials is shown redacted and kept Fernet-encrypted (proxy_ciphertext).
    egress: str = Field(default="", sa_column_kwargs=server_default(""))
    created_at: datetime = Field(default_factory=utcnow)


class ProviderKey(SQLModel, table=True):
    __tablename__ = "provider_key"

    id: str = Field(primary_key=True, default_factory=lambda: new_id("pk"))
    provider_id: str = Field(foreign_key="provider.id", index=True, ondelete="CASCADE")
    ciphertext: str
    # Last four characters, enough to tell keys apart in listings and logs.
    hint: str
    created_at: datetime = Field(default_factory=utcnow)


class ProviderModel(SQLModel, table=True):
    __tablename__ = "provider_model"

    id: str = Field(primary_key=True, default_factory=lambda: new_id("pm"))
    provider_id: str = Field(foreign_key="provider.id", index=True, ondelete="CASCADE")
    alias: str = Field(index=True)
    upstream_model: str
    # USD per one million tokens; None means unpriced (reported as such, never as free).
    price_in: float | None = None
    price_out: float | None = None


class RouteRule(SQLModel, table=True):
    __tablename__ = "route_rule"
    __table_args__ = (UniqueConstraint("org_id", "pattern"),)

    id: str = Field(primary_key=True, default_factory=lambda: new_id("rt"))
    org_id: str = Field(foreign_key="org.id", index=True)
    # A model name or a glob (`gpt-4o*`); an exact match wins over globs.
    pattern: str
    strategy: str
    # Comma-separated provider names, in priority order, each optionally `=weight`.
    targets: str = ""
    # Comma-separated models to fall back to after every target of this one failed.
    fallbacks: str = ""
    # Hedging of a slow first token (server.routing.hedge): off, auto or seconds; None takes the plane's `hedge`
    # setting.
    hedge: str | None = None
    created_at: datetime = Field(default_factory=utcnow)


class LimitPolicy(SQLModel, table=True):
    """Rate limits and quotas of one org (`key_id` empty) or of one of its keys. A None field is unlimited."""

    __tablename__ = "limit_policy"
    __table_args__ = (UniqueConstraint("org_id", "key_id"),)

    id: str = Field(primary_key=True, default_factory=lambda: new_id("lim"))
    org_id: str = Field(foreign_key="org.id", index=True)
    key_id: str = ""
    # 64-bit: a month's quota of 3 billion tokens is an ordinary figure (PostgreSQL's INTEGER stops at 2^31 - 1).
    rpm: int | None = Field(default=None, sa_type=BigInteger)
    tpm: int | None = Field(default=None, sa_type=BigInteger)
    concurrency: int | None = Field(default=None, sa_type=BigInteger)
    tokens_per_day: int | None = Field(default=None, sa_type=BigInteger)
    tokens_per_month: int | None = Field(default=None, sa_type=BigInteger)
    usd_per_day: float | None = None
    usd_per_month: float | None = None
    updated_at: datetime = Field(default_factory=utcnow)


class PriceChange(SQLModel, table=True):
    """Append-only history of a provider model's price: one row each time it is set or changed.

    Usage rows carry the price they were billed at, so a change never rewrites past costs; this table says
    which price was in force when."""

    __tablename__ = "price_change"

    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = Field(default_factory=utcnow, index=True)
    org_id: str = Field(index=True)
    provider: str
    model: str
    price_in: float | None = None
    price_out: float | None = None


class EnrollmentToken(SQLModel, table=True):
    __tablename__ = "enrollment_token"

    id: str = Field(primary_key=True, default_factory=lambda: new_id("ntk"))
    org_id: str = Field(foreign_key="org.id", index=True)
    token_hash: str = Field(unique=True, index=True)
    # How many more enrollments it allows.
    uses_left: int = 1
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    # JSON object of labels given to the nodes enrolled with it.
    labels: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    # The id of the node this token re-enrolls (an admin's `--replace NODE`): the machine enrolling with it takes
    # over that node's id, and the node's earlier credential stops working.
    replace_node_id: str | None = None
    # The account that created it: the nodes enrolled with it are that account's (a provider's own nodes).
    created_by: str | None = Field(default=None, index=True)


class Node(SQLModel, table=True):
    id: str = Field(primary_key=True, default_factory=lambda: new_id("node"))
    org_id: str = Field(foreign_key="org.id", index=True)
    name: str
    # What the agent says identifies its machine: recorded, never proof (see NodeStore.enroll).
    machine_id: str
    credential_hash: str = Field(unique=True, index=True)
    labels: str = ""
    # Drained nodes stay connected but get no new jobs, across reconnects too.
    drained: bool = False
    revoked_at: datetime | None = None
    enrolled_at: datetime = Field(default_factory=utcnow)
    created_at: datetime = Field(default_factory=utcnow)
    # The account whose enrollment token enrolled it (EnrollmentToken.created_by); None: an admin key's token.
    owner_account_id: str | None = Field(default=None, index=True)


class AuditEntry(SQLModel, table=True):
    """One admin mutation. Append-only, and chained: `hash` covers this entry and the previous entry's hash,
    so editing, deleting or reordering a row breaks every hash after it (see server.storage.audit)."""

    __tablename__ = "audit_entry"

    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = Field(default_factory=utcnow, index=True)
    # Who made the change: an admin key's id, a scoped admin token's (`tok_...`) or an account's (`acct_...`).
    actor: str
    action: str
    target: str
    # JSON of the object before and after, secrets redacted; empty when there was none.
    before: str = ""
    after: str = ""
    request_id: str = ""
    prev_hash: str
    hash: str


class UsageRecord(SQLModel, table=True):
    __tablename__ = "usage_record"

    id: int | None = Field(default=None, primary_key=True)
    request_id: str = Field(index=True)
    created_at: datetime = Field(default_factory=utcnow, index=True)
    org_id: str = Field(index=True)
    key_id: str = Field(index=True)
    endpoint: str
    model: str
    target: str = ""
    stream: bool = False
    status: int
    attempts: int = 1
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    error_code: str | None = None
    # False for an attempt that failed and was failed over; the request's own row is the final one.
    final: bool = Field(default=True, sa_column_kwargs=server_default(true()))
    provider_key_id: str | None = None
    # The node that served, for node targets (the target column names the pool).
    node_id: str | None = Field(default=None, index=True)
    # hit, miss or bypass (server.policy.cache); a hit costs nothing and served no tokens upstream.
    cache: str = Field(default="bypass", sa_column_kwargs=server_default("bypass"))
    # The price (USD per 1M tokens) the row was billed at: the one in force when it was served.
    price_in: float | None = None
    price_out: float | None = None
    # The row's own id, made with the row: a row replayed from the usage spool (server.usage.spool) after a crash is
    # inserted only when no row has it yet. NULL for rows from before the spool (a unique index allows many).
    row_id: str | None = Field(default=None, unique=True, index=True)


# -- accounts and what they sign in with (server.accounts) ----------------------------------------------------


class Account(SQLModel, table=True):
    """A person who signs in to the console (or whose scoped tokens call the admin API): a role, and the org
    it is bound to (None for a plane admin)."""

    id: str = Field(primary_key=True, default_factory=lambda: new_id("acct"))
    # Lower-cased: one account per address, however it is typed.
    email: str = Field(unique=True, index=True)
    name: str = ""
    # server.accounts.roles.ROLES
    role: str
    org_id: str | None = Field(default=None, foreign_key="org.id", index=True)
    # argon2id (server.accounts.passwords); never the password.
    password_hash: str
    disabled: bool = False
    created_at: datetime = Field(default_factory=utcnow)


class AccountSession(SQLModel, table=True):
    """A console sign-in. Only the session id's SHA-256 is stored, so logging out or disabling an account ends
    it on every plane sharing the database, and a copy of the table signs nobody in."""

    __tablename__ = "account_session"

    id_hash: str = Field(primary_key=True)
    account_id: str = Field(foreign_key="account.id", index=True, ondelete="CASCADE")
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime = Field(index=True)


class Invitation(SQLModel, table=True):
    """A link that lets one person create their account: single use, expiring, its token stored hashed."""

    id: str = Field(primary_key=True, default_factory=lambda: new_id("inv"))
    token_hash: str = Field(unique=True, index=True)
    email: str
    role: str
    org_id: str | None = Field(default=None, foreign_key="org.id", index=True)
    # The actor who invited (an admin key, token or account id).
    created_by: str
    expires_at: datetime
    used_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)


class AdminToken(SQLModel, table=True):
    """A scoped bearer token for the admin API (`hwt_...`): a role, an org, an expiry; stored hashed."""

    __tablename__ = "admin_token"

    id: str = Field(primary_key=True, default_factory=lambda: new_id("tok"))
    name: str = ""
    token_hash: str = Field(unique=True, index=True)
    role: str
    org_id: str | None = Field(default=None, foreign_key="org.id", index=True)
    # The account it acts for (whose keys or nodes a developer's or provider's token sees); None: the org's.
    account_id: str | None = Field(default=None, index=True)
    created_by: str
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)
