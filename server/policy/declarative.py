"""Orgs and providers declared in the TOML config file, applied at every start.

    [[orgs]]
    name = "acme"

    [[providers]]
    org = "acme"
    name = "openai"
    base_url = "https://api.openai.com/v1"
    api_key_env = ["OPENAI_API_KEY"]        # names of environment variables (or api_keys = ["sk-..."])
    price_in = 0.15                          # USD per 1M tokens, for every model below unless it sets its own
    price_out = 0.60
    models = ["gpt-4o-mini", "fast=gpt-4o-mini", { alias = "big", upstream = "gpt-4o", price_in = 2.5 }]
    continuation = "regenerate"              # how it rescues a broken stream (server.routing.continuation); left out:
    unchanged
    responses = true                         # it serves /v1/responses itself (server.responses); left out: unchanged

What the file declares wins at start-up (a provider is replaced in place, keeping its routing order);
what was created from the CLI and is not in the file is left alone. What a start actually changes is written
to the audit log with the actor `config-file`, like any admin change; re-applying an unchanged file writes
nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from server.api.validation import only_fields
from server.config import ConfigError
from server.errors import HatchwayError
from server.storage.audit import AuditLog
from server.storage.store import Store, parse_models

# The audit log's actor for changes made by the config file rather than by an admin key.
CONFIG_ACTOR = "config-file"
# What each table takes: a misspelt key stops the start rather than being left out unnoticed.
ORG_KEYS = ("name",)
PROVIDER_KEYS = (
    "org",
    "name",
    "base_url",
    "api_keys",
    "api_key_env",
    "models",
    "price_in",
    "price_out",
    "continuation",
    "responses",
)


def apply_declared(store: Store, declared: Mapping[str, Any], origin: Path | None, audit: AuditLog) -> None:
    unknown = set(declared) - {"orgs", "providers"}
    if unknown:
        raise ConfigError(f"{origin}: unknown tables: {', '.join(sorted(unknown))}")

    def record(action: str, before: dict[str, Any] | None, after: dict[str, Any]) -> None:
        target = str(after.get("id") or after.get("name") or "")
        audit.append(
            actor=CONFIG_ACTOR, action=action, target=target, before=before, after=after, request_id=str(origin)
        )

    def ensure_org(name: str) -> None:
        created = store.ensure_org(name)
        if created is not None:
            record("org.create", None, created)

    for i, table in enumerate(_tables(declared, "orgs", origin)):
        try:
            only_fields(table, ORG_KEYS)
            ensure_org(_text(table, "name", f"{origin}: orgs[{i}]"))
        except HatchwayError as exc:  # e.g. a name outside the charset (server.api.validation.check_name)
            raise ConfigError(f"{origin}: orgs[{i}]: {exc.message}") from exc
    for i, provider in enumerate(_tables(declared, "providers", origin)):
        where = f"{origin}: providers[{i}]"
        try:
            only_fields(provider, PROVIDER_KEYS)
            models = parse_models(_list(provider, "models", where), provider.get("price_in"), provider.get("price_out"))
            org, name = _text(provider, "org", where), _text(provider, "name", where)
            ensure_org(org)
            before = next((p for p in store.list_providers(org) if p["name"] == name), None)
            after = store.add_provider(
                org,
                name,
                _text(provider, "base_url", where),
                _api_keys(provider, where),
                models,
                continuation=_optional_text(provider, "continuation", where),
                responses=_optional_bool(provider, "responses", where),
                replace=True,
            )
        except HatchwayError as exc:
            raise ConfigError(f"{where}: {exc.message}") from exc
        if before is None:
            record("provider.add", None, after)
        elif _declared_view(before) != _declared_view(after):
            record("provider.update", before, after)


def _declared_view(provider: dict[str, Any]) -> dict[str, Any]:
    """What the file decides about a provider; key ids are new at each start and say nothing."""
    return {
        "base_url": provider["base_url"],
        "models": provider["models"],
        "api_keys": [k["hint"] for k in provider["api_keys"]],
        "continuation": provider["continuation"],
        "responses": provider["responses"],
    }


def _tables(doc: Mapping[str, Any], name: str, origin: Path | None) -> list[dict[str, Any]]:
    value = doc.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{origin}: {name} must be an array of tables ([[{name}]])")
    return value


def _text(table: Mapping[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: '{key}' must be a non-empty string")
    return value


def _optional_text(table: Mapping[str, Any], key: str, where: str) -> str | None:
    return _text(table, key, where) if key in table else None


def _optional_bool(table: Mapping[str, Any], key: str, where: str) -> bool | None:
    value = table.get(key)
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{where}: '{key}' must be true or false")
    return value


def _list(table: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = table.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"{where}: '{key}' must be an array")
    return value


def _api_keys(provider: Mapping[str, Any], where: str) -> list[str]:
    keys = [str(k) for k in _list(provider, "api_keys", where)]
    for name in _list(provider, "api_key_env", where):
        value = os.environ.get(str(name))
        if not value:
            raise ConfigError(f"{where}: environment variable {name} (api_key_env) is not set")
        keys.append(value)
    return keys
