"""Admin operations over the tables. Synchronous by design: the HTTP layer runs them in a worker thread,
never on the request path of the OpenAI API (which reads only the in-memory snapshot)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from server.api.validation import check_name
from server.credentials import (
    ADMIN_KEY_PREFIX,
    API_KEY_PREFIX,
    DISPLAY_PREFIX_LEN,
    Vault,
    generate_key,
    hash_key,
)
from server.errors import ConflictError, InvalidRequestError, NotFoundError
from server.routing.continuation import PROVIDER_CONTINUATIONS
from server.routing.hedge import parse_hedge
from server.routing.rules import STRATEGIES, parse_targets
from server.storage.models import (
    AdminKey,
    ApiKey,
    LimitPolicy,
    Node,
    Org,
    PriceChange,
    Provider,
    ProviderKey,
    ProviderModel,
    RouteRule,
    iso,
    split_list,
    utcnow,
)
from server.targets.egress import (
    DIRECT,
    FROM_ENVIRONMENT,
    Egress,
    Proxy,
    TLSSettingsError,
    redact,
    tls_context,
)


@dataclass(frozen=True)
class ModelSpec:
    """One model a provider serves: the name clients use, the provider's own name for it, and its price."""

    alias: str
    upstream: str
    price_in: float | None = None
    price_out: float | None = None

    @classmethod
    def parse(cls, raw: Any, price_in: float | None = None, price_out: float | None = None) -> ModelSpec:
        """Accept `"alias"`, `"alias=upstream"` or `{"alias", "upstream", "price_in", "price_out"}`."""
        if isinstance(raw, str):
            alias, _, upstream = raw.partition("=")
            spec = cls(alias.strip(), upstream.strip() or alias.strip(), price_in, price_out)
        elif isinstance(raw, dict) and isinstance(raw.get("alias"), str):
            spec = cls(
                raw["alias"].strip(),
                str(raw.get("upstream") or raw["alias"]).strip(),
                parse_price(raw.get("price_in", price_in), "price_in"),
                parse_price(raw.get("price_out", price_out), "price_out"),
            )
        else:
            raise InvalidRequestError(f"invalid model {raw!r}: expected 'alias[=upstream]'", param="models")
        if not spec.alias or not spec.upstream:
            raise InvalidRequestError(f"invalid model {raw!r}: empty name", param="models")
        return spec


def parse_price(value: Any, param: str) -> float | None:
    """A price in USD per 1M tokens: None (unpriced) or a non-negative number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise InvalidRequestError(f"{param} must be a non-negative number (USD per 1M tokens)", param=param)
    return float(value)


def find_org(session: Session, ref: str) -> Org:
    """An org by id or name; 404 when there is none."""
    org = session.get(Org, ref) or session.exec(select(Org).where(Org.name == ref)).first()
    if org is None:
        raise NotFoundError(f"no org {ref!r}", param="org")
    return org


def org_dict(org: Org) -> dict[str, Any]:
    """An org as the admin API shows it."""
    return {
        "id": org.id,
        "object": "org",
        "name": org.name,
        "providers_may_enroll": org.providers_may_enroll,
        "created_at": iso(org.created_at),
    }


def find_provider(session: Session, ref: str, org_ref: str | None) -> tuple[Provider, Org]:
    """A provider by id or name (with its org); a name used in several orgs needs the org."""
    query = select(Provider, Org).join(Org).where((Provider.id == ref) | (Provider.name == ref))
    if org_ref:
        query = query.where(Provider.org_id == find_org(session, org_ref).id)
    found = session.exec(query).all()
    if not found:
        raise NotFoundError(f"no provider {ref!r}", param="name")
    if len(found) > 1:
        raise InvalidRequestError(f"provider name {ref!r} exists in several orgs: pass --org", param="org")
    return found[0]


def _revoke_admin_keys(session: Session, *, keep: str) -> list[str]:
    """Revoke every valid admin key but the one whose hash is `keep`; returns their ids."""
    now = utcnow()
    rows = session.exec(select(AdminKey).where(AdminKey.key_hash != keep, col(AdminKey.revoked_at).is_(None))).all()
    for row in rows:
        row.revoked_at = now
        session.add(row)
    return [row.id for row in rows]


class Store:
    def __init__(self, engine: Engine, vault: Vault) -> None:
        self.engine = engine
        self.vault = vault

    # -- admin keys -------------------------------------------------------------------------------

    def ensure_admin_key(self) -> str | None:
        """Make sure an admin key exists when none is configured. Returns a newly generated key (to print once),
        else None: the key generated on the first start, or the last one rotated, stays valid."""
        with Session(self.engine) as session:
            if session.exec(select(AdminKey).where(col(AdminKey.revoked_at).is_(None))).first():
                return None
            key = generate_key(ADMIN_KEY_PREFIX)
            session.add(AdminKey(name="initial", key_hash=hash_key(key)))
            session.commit()
            return key

    def configure_admin_key(self, key: str) -> dict[str, Any]:
        """Make the configured key (HATCHWAY_ADMIN_KEY) the one admin key: every other is revoked, the previously
        configured, generated or rotated one included. Setting a new value and restarting is how an operator
        rotates; a value set again after it was replaced is valid again, since the configuration is the
        authority. Returns the key's id and the ids of the keys it revoked."""
        digest = hash_key(key)
        with Session(self.engine) as session:
            row = session.exec(select(AdminKey).where(AdminKey.key_hash == digest)).first()
            if row is None:
                row = AdminKey(name="configured", key_hash=digest)
            row.revoked_at = None
            session.add(row)
            revoked = _revoke_admin_keys(session, keep=digest)
            session.commit()
            return {"id": row.id, "revoked": revoked}

    def rotate_admin_key(self) -> dict[str, Any]:
        """Replace every admin key with a new generated one, returned once; the previous keys are refused."""
        key = generate_key(ADMIN_KEY_PREFIX)
        row = AdminKey(name="rotated", key_hash=hash_key(key))
        with Session(self.engine) as session:
            revoked = _revoke_admin_keys(session, keep=row.key_hash)
            session.add(row)
            session.commit()
            session.refresh(row)
            return {
                "id": row.id,
                "object": "admin_key",
                "key": key,
                "created_at": iso(row.created_at),
                "revoked": revoked,
            }

    # -- orgs -------------------------------------------------------------------------------------

    def create_org(self, name: str) -> dict[str, Any]:
        name = check_name(name.strip(), what="org name")
        with Session(self.engine) as session:
            if session.exec(select(Org).where(Org.name == name)).first():
                raise ConflictError(f"org {name!r} already exists", param="name")
            org = Org(name=name)
            session.add(org)
            session.commit()
            return org_dict(org)

    def list_orgs(self) -> list[dict[str, Any]]:
        with Session(self.engine) as session:
            return [org_dict(o) for o in session.exec(select(Org).order_by(col(Org.created_at)))]

    def ensure_org(self, name: str) -> dict[str, Any] | None:
        """Create the org unless it exists; returns the new org, or None when it was already there."""
        with Session(self.engine) as session:
            if session.exec(select(Org).where(Org.name == name)).first() is not None:
                return None
            org = Org(name=check_name(name, what="org name"))
            session.add(org)
            session.commit()
            return org_dict(org)

    # -- API keys ---------------------------------------------------------------------------------

    def create_key(
        self,
        org_ref: str,
        name: str = "",
        models: Sequence[str] = (),
        expires_at: datetime | None = None,
        owner_account_id: str | None = None,
    ) -> dict[str, Any]:
        if expires_at is not None and expires_at <= utcnow():
            raise InvalidRequestError("expires_at is in the past", param="expires_at")
        key = generate_key(API_KEY_PREFIX)
        with Session(self.engine) as session:
            org = find_org(session, org_ref)
            row = ApiKey(
                org_id=org.id,
                name=name,
                prefix=key[:DISPLAY_PREFIX_LEN],
                key_hash=hash_key(key),
                models=",".join(m.strip() for m in models if m.strip()),
                expires_at=expires_at,
                owner_account_id=owner_account_id,
            )
            session.add(row)
            session.commit()
            return self._key_dict(row, org) | {"key": key}

    def list_keys(self, org_ref: str | None = None, owner: str | None = None) -> list[dict[str, Any]]:
        """The keys of an org (or all), or only those an account owns (a developer's)."""
        with Session(self.engine) as session:
            query = select(ApiKey, Org).join(Org).order_by(col(ApiKey.created_at))
            if org_ref:
                query = query.where(ApiKey.org_id == find_org(session, org_ref).id)
            if owner is not None:
                query = query.where(ApiKey.owner_account_id == owner)
            return [self._key_dict(k, o) for k, o in session.exec(query)]

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        with Session(self.engine) as session:
            row = session.get(ApiKey, key_id)
            if row is None:
                raise NotFoundError(f"no API key {key_id!r}", param="id")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
                session.add(row)
                session.commit()
            org = session.get(Org, row.org_id)
            assert org is not None
            return self._key_dict(row, org)

    @staticmethod
    def _key_dict(row: ApiKey, org: Org) -> dict[str, Any]:
        return {
            "id": row.id,
            "object": "api_key",
            "org": org.name,
            "org_id": org.id,
            "name": row.name,
            "prefix": row.prefix,
            "models": split_list(row.models),
            "expires_at": iso(row.expires_at),
            "revoked_at": iso(row.revoked_at),
            "created_at": iso(row.created_at),
            "owner_account_id": row.owner_account_id,
            "console": row.console,
        }

    # -- providers --------------------------------------------------------------------------------

    def add_provider(
        self,
        org_ref: str,
        name: str,
        base_url: str,
        api_keys: Sequence[str],
        models: Sequence[ModelSpec],
        *,
        policy: dict[str, float | int] | None = None,
        continuation: str | None = None,
        egress: Mapping[str, str] | None = None,
        responses: bool | None = None,
        replace: bool = False,
    ) -> dict[str, Any]:
        """Add a provider; with `replace`, an existing one of that name is updated in place (keeps its order).
        `continuation` and `responses` None: the default for a new provider, the current one for a replaced one."""
        name = name.strip()
        if not name:
            raise InvalidRequestError("provider name must not be empty", param="name")
        try:
            parts = urlsplit(base_url)
            parts.port  # noqa: B018 - raises for a port that is not a number or out of range
        except ValueError:  # also an unbalanced or invalid [IPv6] host: that was a 500
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise InvalidRequestError(f"base_url must be an http(s) URL, got {base_url!r}", param="base_url")
        if not models:
            raise InvalidRequestError("a provider needs at least one model", param="models")
        if continuation is not None:
            _check_continuation(continuation)
        aliases = [m.alias for m in models]
        if len(set(aliases)) != len(aliases):
            raise InvalidRequestError("a model alias is listed twice", param="models")
        with Session(self.engine) as session:
            org = find_org(session, org_ref)
            existing = session.exec(select(Provider).where(Provider.org_id == org.id, Provider.name == name)).first()
            if existing is not None and not replace:
                raise ConflictError(f"provider {name!r} already exists in org {org.name!r}", param="name")
            previous_prices: dict[str, tuple[float | None, float | None]] = {}
            if existing is None:
                last = session.exec(select(func.max(Provider.position))).one()
                provider = Provider(org_id=org.id, name=name, base_url=base_url, position=(last or 0) + 1)
            else:
                provider = existing
                provider.base_url = base_url
                previous_prices = {
                    m.alias: (m.price_in, m.price_out)
                    for m in session.exec(select(ProviderModel).where(ProviderModel.provider_id == provider.id))
                }
                self._delete_children(session, provider.id)
            provider.policy = json.dumps(policy) if policy else ""
            if continuation is not None:
                provider.continuation = continuation
            if responses is not None:
                provider.responses = responses
            if egress:
                provider.egress = self._egress_column(provider.egress, egress)
            session.add(provider)
            session.flush()
            for key in api_keys:
                session.add(ProviderKey(provider_id=provider.id, ciphertext=self.vault.encrypt(key), hint=key[-4:]))
            for spec in models:
                session.add(
                    ProviderModel(
                        provider_id=provider.id,
                        alias=spec.alias,
                        upstream_model=spec.upstream,
                        price_in=spec.price_in,
                        price_out=spec.price_out,
                    )
                )
                if previous_prices.get(spec.alias, ()) != (spec.price_in, spec.price_out):
                    # Prices are versioned: each new one is appended to the history, none is rewritten.
                    session.add(
                        PriceChange(
                            org_id=org.id,
                            provider=name,
                            model=spec.alias,
                            price_in=spec.price_in,
                            price_out=spec.price_out,
                        )
                    )
            session.commit()
            return self._provider_dict(session, provider, org)

    def update_provider(
        self,
        ref: str,
        org_ref: str | None,
        *,
        policy: dict[str, float | int] | None = None,
        continuation: str | None = None,
        egress: Mapping[str, str] | None = None,
        responses: bool | None = None,
    ) -> dict[str, Any]:
        """Change a provider's failover policy (merged into its overrides), how it continues a broken stream,
        whether it serves /v1/responses itself, or its egress settings (those named change, see `_egress_column`)."""
        with Session(self.engine) as session:
            provider, org = find_provider(session, ref, org_ref)
            if policy:
                provider.policy = json.dumps({**(json.loads(provider.policy) if provider.policy else {}), **policy})
            if continuation is not None:
                _check_continuation(continuation)
                provider.continuation = continuation
            if responses is not None:
                provider.responses = responses
            if egress:
                provider.egress = self._egress_column(provider.egress, egress)
            session.add(provider)
            session.commit()
            return self._provider_dict(session, provider, org)

    def list_providers(self, org_ref: str | None = None) -> list[dict[str, Any]]:
        with Session(self.engine) as session:
            query = select(Provider, Org).join(Org).order_by(col(Provider.position))
            if org_ref:
                query = query.where(Provider.org_id == find_org(session, org_ref).id)
            return [self._provider_dict(session, p, o) for p, o in session.exec(query)]

    def listed_provider(self, ref: str, org_ref: str | None = None) -> dict[str, Any] | None:
        """The first listed provider whose id or name is `ref` (in `org_ref` when given), as the listing shows it."""
        return next((p for p in self.list_providers(org_ref) if ref in (p["id"], p["name"])), None)

    def remove_provider(self, ref: str, org_ref: str | None = None) -> dict[str, Any]:
        with Session(self.engine) as session:
            provider, org = find_provider(session, ref, org_ref)
            result = self._provider_dict(session, provider, org)
            self._delete_children(session, provider.id)
            session.delete(provider)
            session.commit()
            return result

    def _egress_column(self, current: str, changes: Mapping[str, str]) -> str:
        """A provider's stored egress settings with `changes` applied, checked: `proxy` is a URL, `none` or `env`
        (the environment's, the default); the files are absolute paths on the plane's machine that it can use
        now. An empty value removes a setting. A proxy URL with credentials is stored encrypted, as provider keys
        are, and shown redacted."""
        settings: dict[str, str] = json.loads(current) if current else {}
        for name, raw in changes.items():
            value = raw.strip()
            if name == "proxy":
                settings.pop("proxy", None)
                settings.pop("proxy_ciphertext", None)
                if value in ("", FROM_ENVIRONMENT):
                    continue
                if value != DIRECT:
                    try:
                        Proxy.parse(value)
                    except ValueError as exc:
                        raise InvalidRequestError(str(exc), param="proxy") from None
                    if redact(value) != value:
                        settings["proxy_ciphertext"] = self.vault.encrypt(value)
                settings["proxy"] = redact(value)
            elif not value:
                settings.pop(name, None)
            elif not os.path.isabs(value):
                raise InvalidRequestError(f"{name} must be an absolute path on the plane's machine", param=name)
            else:
                settings[name] = value
        own = Egress(
            ca_file=settings.get("ca_file"),
            client_cert=settings.get("client_cert"),
            client_key=settings.get("client_key"),
        )
        if own.files:
            try:
                tls_context(own)
            except TLSSettingsError as exc:
                raise InvalidRequestError(str(exc), param=exc.param) from None
        return json.dumps(settings, sort_keys=True) if settings else ""

    def provider_egress(self, provider: Provider) -> Egress | None:
        """The provider's own egress settings, its proxy's credentials decrypted; None when it has none."""
        if not provider.egress:
            return None
        settings = json.loads(provider.egress)
        proxy = settings.get("proxy")
        if "proxy_ciphertext" in settings:
            proxy = self.vault.decrypt(settings["proxy_ciphertext"])
        return Egress(
            proxy=Proxy.parse(proxy) if proxy and proxy != DIRECT else None,
            direct=proxy == DIRECT,
            ca_file=settings.get("ca_file"),
            client_cert=settings.get("client_cert"),
            client_key=settings.get("client_key"),
        )

    @staticmethod
    def _delete_children(session: Session, provider_id: str) -> None:
        for table in (ProviderKey, ProviderModel):
            for row in session.exec(select(table).where(table.provider_id == provider_id)):
                session.delete(row)
        session.flush()

    @staticmethod
    def _provider_dict(session: Session, provider: Provider, org: Org) -> dict[str, Any]:
        keys = session.exec(select(ProviderKey).where(ProviderKey.provider_id == provider.id)).all()
        models = session.exec(select(ProviderModel).where(ProviderModel.provider_id == provider.id)).all()
        return {
            "id": provider.id,
            "object": "provider",
            "org": org.name,
            "org_id": org.id,
            "name": provider.name,
            "base_url": provider.base_url,
            # Never the key itself: its id and last four characters are enough to tell keys apart.
            "api_keys": [{"id": k.id, "hint": f"...{k.hint}"} for k in keys],
            "models": [
                {
                    "alias": m.alias,
                    "upstream": m.upstream_model,
                    "price_in": m.price_in,
                    "price_out": m.price_out,
                }
                for m in models
            ],
            "policy": json.loads(provider.policy) if provider.policy else {},
            "continuation": provider.continuation,
            "responses": provider.responses,
            # Never the proxy's credentials: the URL shows `***` in their place.
            "egress": {k: v for k, v in json.loads(provider.egress or "{}").items() if k != "proxy_ciphertext"},
            "created_at": iso(provider.created_at),
        }

    # -- routing rules ----------------------------------------------------------------------------

    def set_route(
        self,
        org_ref: str,
        pattern: str,
        strategy: str,
        targets: Sequence[str],
        fallbacks: Sequence[str],
        hedge: str | None = None,
    ) -> dict[str, Any]:
        """Create or replace the org's rule for a model name or glob (`hedge` None: the plane's default)."""
        if not pattern.strip():
            raise InvalidRequestError("the model (or glob) must not be empty", param="model")
        if hedge is not None:
            try:
                hedge = parse_hedge(hedge)
            except ValueError as exc:
                raise InvalidRequestError(str(exc), param="hedge") from exc
        if strategy not in STRATEGIES:
            raise InvalidRequestError(f"strategy must be one of {', '.join(STRATEGIES)}", param="strategy")
        try:
            names, _ = parse_targets(targets)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="targets") from exc
        with Session(self.engine) as session:
            org = find_org(session, org_ref)
            # "nodes" names the org's node pool for the model (server.targets.node.NODES_TARGET).
            known = {"nodes", *session.exec(select(Provider.name).where(Provider.org_id == org.id))}
            unknown = [n for n in names if n not in known]
            if unknown:
                raise InvalidRequestError(
                    f"no provider {', '.join(map(repr, unknown))} in org {org.name!r}", param="targets"
                )
            rule = session.exec(
                select(RouteRule).where(RouteRule.org_id == org.id, RouteRule.pattern == pattern)
            ).first() or RouteRule(org_id=org.id, pattern=pattern, strategy=strategy)
            rule.strategy = strategy
            rule.targets = ",".join(t.strip() for t in targets)
            rule.fallbacks = ",".join(f.strip() for f in fallbacks if f.strip())
            rule.hedge = hedge
            session.add(rule)
            session.commit()
            return self._route_dict(rule, org)

    def list_routes(self, org_ref: str | None = None) -> list[dict[str, Any]]:
        with Session(self.engine) as session:
            query = select(RouteRule, Org).join(Org).order_by(col(RouteRule.created_at))
            if org_ref:
                query = query.where(RouteRule.org_id == find_org(session, org_ref).id)
            return [self._route_dict(r, o) for r, o in session.exec(query)]

    def remove_route(self, org_ref: str, pattern: str) -> dict[str, Any]:
        with Session(self.engine) as session:
            org = find_org(session, org_ref)
            rule = session.exec(
                select(RouteRule).where(RouteRule.org_id == org.id, RouteRule.pattern == pattern)
            ).first()
            if rule is None:
                raise NotFoundError(f"no routing rule for {pattern!r} in org {org.name!r}", param="model")
            result = self._route_dict(rule, org)
            session.delete(rule)
            session.commit()
            return result

    @staticmethod
    def _route_dict(rule: RouteRule, org: Org) -> dict[str, Any]:
        return {
            "id": rule.id,
            "object": "route",
            "org": org.name,
            "org_id": org.id,
            "model": rule.pattern,
            "strategy": rule.strategy,
            "targets": split_list(rule.targets),
            "fallbacks": split_list(rule.fallbacks),
            "hedge": rule.hedge,
            "created_at": iso(rule.created_at),
        }

    # -- what the snapshot is built from ----------------------------------------------------------

    def load_all(self) -> SnapshotRows:
        with Session(self.engine) as session:
            return SnapshotRows(
                orgs=list(session.exec(select(Org))),
                admin_keys=list(session.exec(select(AdminKey).where(col(AdminKey.revoked_at).is_(None)))),
                api_keys=list(session.exec(select(ApiKey).where(col(ApiKey.revoked_at).is_(None)))),
                providers=list(session.exec(select(Provider).order_by(col(Provider.position)))),
                provider_keys=list(session.exec(select(ProviderKey).order_by(col(ProviderKey.created_at)))),
                provider_models=list(session.exec(select(ProviderModel))),
                routes=list(session.exec(select(RouteRule).order_by(col(RouteRule.created_at)))),
                nodes=list(session.exec(select(Node).where(col(Node.revoked_at).is_(None)))),
                limits=list(session.exec(select(LimitPolicy))),
            )

    def ping(self) -> None:
        with Session(self.engine) as session:
            session.exec(select(1)).one()


@dataclass(frozen=True)
class SnapshotRows:
    orgs: list[Org]
    admin_keys: list[AdminKey]
    api_keys: list[ApiKey]
    providers: list[Provider]
    provider_keys: list[ProviderKey]
    provider_models: list[ProviderModel]
    routes: list[RouteRule]
    nodes: list[Node]
    limits: list[LimitPolicy]


def _check_continuation(continuation: str) -> None:
    if continuation not in PROVIDER_CONTINUATIONS:
        raise InvalidRequestError(
            f"continuation must be one of {', '.join(PROVIDER_CONTINUATIONS)}", param="continuation"
        )


def parse_models(raw: Iterable[Any], price_in: float | None, price_out: float | None) -> list[ModelSpec]:
    return [ModelSpec.parse(item, price_in, price_out) for item in raw]
