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

What the file declares wins at start-up (a provider is replaced in place, keeping its routing order);
what was created from the CLI and is not in the file is left alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from server.config import ConfigError
from server.errors import HatchwayError
from server.storage.store import Store, parse_models


def apply_declared(store: Store, declared: Mapping[str, Any], origin: Path | None) -> None:
    unknown = set(declared) - {"orgs", "providers"}
    if unknown:
        raise ConfigError(f"{origin}: unknown tables: {', '.join(sorted(unknown))}")
    for i, org in enumerate(_tables(declared, "orgs", origin)):
        where = f"{origin}: orgs[{i}]"
        store.ensure_org(_text(org, "name", where))
    for i, provider in enumerate(_tables(declared, "providers", origin)):
        where = f"{origin}: providers[{i}]"
        try:
            models = parse_models(_list(provider, "models", where), provider.get("price_in"), provider.get("price_out"))
            store.ensure_org(_text(provider, "org", where))
            store.add_provider(
                _text(provider, "org", where),
                _text(provider, "name", where),
                _text(provider, "base_url", where),
                _api_keys(provider, where),
                models,
                replace=True,
            )
        except HatchwayError as exc:
            raise ConfigError(f"{where}: {exc.message}") from exc


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
