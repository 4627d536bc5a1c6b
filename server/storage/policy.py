"""Admin operations on an org's policy: limits and quotas, the cache policy, and model prices.

Synchronous, like `server.storage.store`: the admin API runs them in a worker thread and rebuilds the snapshot
after each commit; the request path never calls them.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from server.errors import InvalidRequestError, NotFoundError
from server.policy.cache import CACHE_MODES
from server.policy.limits import INTEGER_LIMITS, LIMIT_FIELDS, key_scope, org_scope
from server.storage.models import (
    ApiKey,
    LimitPolicy,
    Org,
    PriceChange,
    ProviderModel,
    UsageRecord,
    iso,
    utcnow,
)
from server.storage.store import find_org, find_provider, parse_price

# The largest integer limit: what a 64-bit column holds.
MAX_LIMIT = 2**63 - 1


def check_limit_values(values: Mapping[str, Any]) -> dict[str, int | float | None]:
    """Limit fields to set: a non-negative number, or None to lift that limit."""
    unknown = set(values) - set(LIMIT_FIELDS)
    if unknown:
        raise InvalidRequestError(f"unknown limits: {', '.join(sorted(unknown))}", param=sorted(unknown)[0])
    checked: dict[str, int | float | None] = {}
    for name, value in values.items():
        if value is None:
            checked[name] = None
        elif name in INTEGER_LIMITS:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LIMIT:
                raise InvalidRequestError(
                    f"{name} must be an integer from 0 to {MAX_LIMIT}, or null to lift it", param=name
                )
            checked[name] = value
        else:
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise InvalidRequestError(f"{name} must be a non-negative number (USD), or null to lift it", param=name)
            checked[name] = float(value)
    return checked


class PolicyStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- limits -----------------------------------------------------------------------------------

    def set_limits(self, org_ref: str | None, key_id: str | None, values: Mapping[str, Any]) -> dict[str, Any]:
        """Set (or lift, with None) some limits of an org or a key; the others stay as they were."""
        checked = check_limit_values(values)
        if not checked:
            raise InvalidRequestError("give at least one limit to set", param="limits")
        with Session(self.engine) as session:
            org, key = self._subject(session, org_ref, key_id)
            row = self._row(session, org, key) or LimitPolicy(org_id=org.id, key_id=key.id if key else "")
            for name, value in checked.items():
                setattr(row, name, value)
            row.updated_at = utcnow()
            session.add(row)
            session.commit()
            return self._limit_dict(row, org, key)

    def get_limits(self, org_ref: str | None, key_id: str | None) -> dict[str, Any] | None:
        with Session(self.engine) as session:
            org, key = self._subject(session, org_ref, key_id)
            row = self._row(session, org, key)
            return self._limit_dict(row, org, key) if row else None

    def list_limits(self, org_ref: str | None = None) -> list[dict[str, Any]]:
        with Session(self.engine) as session:
            query = select(LimitPolicy, Org).join(Org).order_by(col(Org.name), col(LimitPolicy.key_id))
            if org_ref:
                query = query.where(LimitPolicy.org_id == find_org(session, org_ref).id)
            result = []
            for row, org in session.exec(query):
                key = session.get(ApiKey, row.key_id) if row.key_id else None
                result.append(self._limit_dict(row, org, key))
            return result

    def remove_limits(self, org_ref: str | None, key_id: str | None) -> dict[str, Any]:
        with Session(self.engine) as session:
            org, key = self._subject(session, org_ref, key_id)
            row = self._row(session, org, key)
            if row is None:
                raise NotFoundError(f"no limits set on {'key ' + key.id if key else 'org ' + org.name}")
            result = self._limit_dict(row, org, key)
            session.delete(row)
            session.commit()
            return result

    @staticmethod
    def _subject(session: Session, org_ref: str | None, key_id: str | None) -> tuple[Org, ApiKey | None]:
        if bool(org_ref) == bool(key_id):
            raise InvalidRequestError("name exactly one of an org or a key", param="org")
        if key_id:
            key = session.get(ApiKey, key_id)
            if key is None:
                raise NotFoundError(f"no API key {key_id!r}", param="key")
            org = session.get(Org, key.org_id)
            assert org is not None
            return org, key
        assert org_ref
        return find_org(session, org_ref), None

    @staticmethod
    def _row(session: Session, org: Org, key: ApiKey | None) -> LimitPolicy | None:
        return session.exec(
            select(LimitPolicy).where(LimitPolicy.org_id == org.id, LimitPolicy.key_id == (key.id if key else ""))
        ).first()

    @staticmethod
    def _limit_dict(row: LimitPolicy, org: Org, key: ApiKey | None) -> dict[str, Any]:
        return {
            "id": row.id,
            "object": "limits",
            "scope": key_scope(key.id) if key else org_scope(org.id),
            "org": org.name,
            "org_id": org.id,
            "key_id": key.id if key else None,
            **{name: getattr(row, name) for name in LIMIT_FIELDS},
            "updated_at": iso(row.updated_at),
        }

    # -- cache policy -----------------------------------------------------------------------------

    def set_cache_policy(self, org_ref: str, mode: str | None, ttl_s: int | None) -> dict[str, Any]:
        if mode is not None and mode not in CACHE_MODES:
            raise InvalidRequestError(f"cache mode must be one of {', '.join(CACHE_MODES)}", param="mode")
        # Bounded by what the column holds: a larger one was a 500 (OverflowError) at commit.
        if ttl_s is not None and (isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or not 0 <= ttl_s <= MAX_LIMIT):
            raise InvalidRequestError(f"ttl_s must be a whole number of seconds from 0 to {MAX_LIMIT}", param="ttl_s")
        with Session(self.engine) as session:
            org = find_org(session, org_ref)
            if mode is not None:
                org.cache_mode = mode
            if ttl_s is not None:
                org.cache_ttl_s = ttl_s
            session.add(org)
            session.commit()
            return self._cache_dict(org)

    def list_cache_policies(self, org_ref: str | None = None) -> list[dict[str, Any]]:
        with Session(self.engine) as session:
            if org_ref:
                return [self._cache_dict(find_org(session, org_ref))]
            return [self._cache_dict(o) for o in session.exec(select(Org).order_by(col(Org.name)))]

    @staticmethod
    def _cache_dict(org: Org) -> dict[str, Any]:
        return {
            "object": "cache_policy",
            "org": org.name,
            "org_id": org.id,
            "mode": org.cache_mode,
            "ttl_s": org.cache_ttl_s,
        }

    # -- prices -----------------------------------------------------------------------------------

    def set_price(
        self, provider_ref: str, org_ref: str | None, model: str, price_in: Any, price_out: Any
    ) -> dict[str, Any]:
        """Change the price of one model of a provider from now on; past usage keeps the price it was billed at."""
        new_in, new_out = parse_price(price_in, "price_in"), parse_price(price_out, "price_out")
        with Session(self.engine) as session:
            provider, org = find_provider(session, provider_ref, org_ref)
            row = session.exec(
                select(ProviderModel).where(ProviderModel.provider_id == provider.id, ProviderModel.alias == model)
            ).first()
            if row is None:
                raise NotFoundError(f"provider {provider.name!r} has no model {model!r}", param="model")
            row.price_in, row.price_out = new_in, new_out
            session.add(row)
            change = PriceChange(org_id=org.id, provider=provider.name, model=model, price_in=new_in, price_out=new_out)
            session.add(change)
            session.commit()
            return self._price_dict(change, org)

    def price_history(self, org_ref: str | None = None, provider: str | None = None) -> list[dict[str, Any]]:
        with Session(self.engine) as session:
            query = select(PriceChange, Org).join(Org, col(Org.id) == col(PriceChange.org_id))
            if org_ref:
                query = query.where(PriceChange.org_id == find_org(session, org_ref).id)
            if provider:
                query = query.where(PriceChange.provider == provider)
            query = query.order_by(col(PriceChange.created_at), col(PriceChange.id))
            return [self._price_dict(change, org) for change, org in session.exec(query)]

    @staticmethod
    def _price_dict(change: PriceChange, org: Org) -> dict[str, Any]:
        return {
            "id": change.id,
            "object": "price",
            "org": org.name,
            "provider": change.provider,
            "model": change.model,
            "price_in": change.price_in,
            "price_out": change.price_out,
            "effective_from": iso(change.created_at),
        }

    # -- what quotas have used, for the limiter at start-up ---------------------------------------

    def used_since(self, since: datetime) -> list[tuple[str, str, int, float]]:
        """(org id, key id, tokens, USD) of the requests served since `since`, per key."""
        with Session(self.engine) as session:
            query = (
                select(
                    UsageRecord.org_id,
                    UsageRecord.key_id,
                    func.sum(UsageRecord.prompt_tokens + UsageRecord.completion_tokens),
                    func.sum(func.coalesce(UsageRecord.cost_usd, 0.0)),
                )
                .where(col(UsageRecord.final), col(UsageRecord.created_at) >= since)
                .group_by(col(UsageRecord.org_id), col(UsageRecord.key_id))
            )
            return [(org, key, int(tokens or 0), float(usd or 0.0)) for org, key, tokens, usd in session.exec(query)]
