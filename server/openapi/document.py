"""The plane's API as one OpenAPI 3.1 document, served at GET /openapi.json and rendered at GET /api-reference.

What it covers: the admin API (/admin/v1/*, /auth/*), the OpenAI subset the plane serves (/v1/*) and the
operations endpoints. Every route the app registers is here, and nothing else: tests/server/openapi/test_document.py
walks the router both ways, and tests/server/openapi/test_contract.py runs Schemathesis against a real plane, so a
request schema says exactly what the handler refuses (a 400 for anything the schema does not allow) and a
response schema what the handler answers.

How it is written: one `Operation` per route, in `OPERATIONS`, with small schema helpers; the value lists the
handlers check against (limit fields, cache modes, strategies...) are read from the modules that own them, so
the document cannot fall behind them. The OpenAI request bodies are not written twice: they are the schemas the
plane validates with (server/openapi/openai-requests.json, vendored from OpenAI's own document), merged into
`components.schemas` under their own names. The document is built once, on first use (`document()`, `body()`).

Browser pages (the console under /console, the API reference page itself) are not API operations: `is_page`
names them, and the coverage test skips them.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, fields
from typing import Any

import orjson

from proto.contract import PLANE_ADDRESS_MAX_CHARS, PLANES_MAX
from server import __version__
from server.accounts import http as accounts_http
from server.accounts.passwords import MAX_LENGTH as PASSWORD_MAX
from server.accounts.passwords import MIN_LENGTH as PASSWORD_MIN
from server.accounts.principal import ADMIN_TOKEN_PREFIX
from server.accounts.roles import ROLES
from server.accounts.sessions import CSRF_HEADER, SESSION_COOKIE
from server.api.schema import COMPONENTS, SCHEMA_FILE
from server.api.validation import MAX_JSON_DEPTH, NAME_MAX_CHARS
from server.console import stats as console_stats
from server.policy.cache import CACHE_MODES
from server.policy.limits import INTEGER_LIMITS, LIMIT_FIELDS
from server.routing.continuation import PROVIDER_CONTINUATIONS
from server.routing.failover import FailoverPolicy
from server.routing.rules import STRATEGIES
from server.storage.policy import MAX_LIMIT
from server.usage.reports import EARNINGS_GROUPS, GROUPS

Schema = dict[str, Any]

# -- schema helpers ------------------------------------------------------------------------------------------


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    """`schema` or null (JSON Schema 2020-12: OpenAPI 3.1 has no `nullable`)."""
    kind = schema.get("type")
    if isinstance(kind, str) and "enum" not in schema:
        return {**schema, "type": [kind, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def obj(required: dict[str, Any] | None = None, optional: dict[str, Any] | None = None, **extra: Any) -> Schema:
    """An object with these required and optional properties. Open (other properties allowed) unless `extra`
    says otherwise: answers may grow. Request bodies are `request_body`."""
    properties = {**(required or {}), **(optional or {})}
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return {**schema, **extra}


def request_body(required: dict[str, Any] | None = None, optional: dict[str, Any] | None = None) -> Schema:
    """A body of the admin or sign-in API: these properties and no other, as its handler takes it (a field it does
    not take is refused, server.api.validation.only_fields)."""
    return obj(required, optional, additionalProperties=False)


STRING: Schema = {"type": "string"}
# What the handlers' `_str` accepts for a required field: a string with something besides whitespace.
NON_EMPTY: Schema = {"type": "string", "pattern": r"\S"}
# An optional text field: a string, or null for "not given".
OPTIONAL_STRING: Schema = {"type": ["string", "null"]}
INTEGER: Schema = {"type": "integer"}
NUMBER: Schema = {"type": "number"}
BOOLEAN: Schema = {"type": "boolean"}
TIMESTAMP: Schema = {"type": "string", "format": "date-time"}
ID: Schema = {"type": "string"}
STRINGS: Schema = {"type": "array", "items": STRING}
ANY_JSON: Schema = {}
# A price in USD per 1M tokens; null is "unpriced".
PRICE: Schema = {"type": ["number", "null"], "minimum": 0}
# What server.api.validation.check_name accepts, around the whitespace the org handler strips first.
ORG_NAME: Schema = {"type": "string", "pattern": rf"^\s*[A-Za-z0-9._-]{{1,{NAME_MAX_CHARS}}}\s*$"}


def const(value: str) -> Schema:
    return {"type": "string", "const": value}


def enum(values: tuple[str, ...] | list[str]) -> Schema:
    return {"type": "string", "enum": list(values)}


def listing(item: Schema) -> Schema:
    return obj({"object": const("list"), "data": {"type": "array", "items": item}})


# -- parameters ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """A query parameter (or, with `where="header"`, a request header)."""

    name: str
    description: str
    schema: Schema = field(default_factory=lambda: STRING)
    required: bool = False
    where: str = "query"

    def render(self) -> Schema:
        return {
            "name": self.name,
            "in": self.where,
            "required": self.required,
            "description": self.description,
            "schema": self.schema,
        }


ORG_QUERY = Param("org", "Only this org (its id or name); 404 when there is none.")
CACHE_HEADER = Param(
    "X-Hatchway-Cache",
    "Cache directives, comma-separated: `bypass`, `no-store`, `ttl=SECONDS`; anything else is a 400.",
    where="header",
)
ORG_HEADER = Param(
    "X-Hatchway-Org",
    "With a plane admin's console session: the org (id or name) whose console key runs the request.",
    where="header",
)
SINCE_QUERY = Param("since", "Only what happened from this moment on (ISO 8601; UTC when it has no offset).", TIMESTAMP)

# -- operations ----------------------------------------------------------------------------------------------

# Who may call: the admin API takes the global admin key, a scoped admin token or a console session; /v1 takes
# an API key (or a console session, for the playground); `public` needs nothing; `metrics` the admin key or
# the metrics token (unless /metrics is public).
ADMIN, API, PUBLIC, METRICS, SESSION = "admin", "api", "public", "metrics", "session"


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    tag: str
    auth: str
    # status -> the answer's schema (None: no body), or a ready OpenAPI response object.
    ok: dict[int, Schema | None]
    body: Schema | None = None
    query: tuple[Param, ...] = ()
    # Error statuses beyond those every operation of its kind has (see `_errors`).
    errors: tuple[int, ...] = ()
    description: str = ""
    body_example: Schema | None = None

    @property
    def operation_id(self) -> str:
        words = re.findall(r"[a-z0-9]+", f"{self.method} {self.path.replace('/admin/v1', 'admin')}".lower())
        return "_".join(words)


# -- the error envelope ---------------------------------------------------------------------------------------

ERROR = obj(
    {
        "error": obj(
            {
                "message": STRING,
                "type": STRING,
                "param": OPTIONAL_STRING,
                "code": OPTIONAL_STRING,
            }
        )
    }
)

# Every error status the plane answers, and what it means; each is a shared response in `components.responses`.
ERROR_RESPONSES = {
    400: ("BadRequest", "The request is invalid; `error.param` names the field."),
    401: ("Unauthorized", "No credential, or one the plane does not know (or expired)."),
    403: ("Forbidden", "The credential is known but may not do this (role, org, model or CSRF token)."),
    404: ("NotFound", "No such object (org, key, provider, node...) or model."),
    405: ("MethodNotAllowed", "The path exists but not with this method (the `Allow` header lists those it has)."),
    408: ("RequestTimeout", "The client sent its request too slowly."),
    409: ("Conflict", "It exists already, or the plane's configuration decides it."),
    413: ("TooLarge", "The body is larger than the plane accepts."),
    415: ("UnsupportedMediaType", "The body is not declared as application/json."),
    422: ("Unprocessable", "The upstream refused the request (its own envelope, passed through)."),
    429: ("TooManyRequests", "A rate limit (Retry-After says when to retry) or a quota (x-should-retry: false)."),
    502: ("BadGateway", "Every target failed; the message names the last one and what went wrong."),
    503: ("Unavailable", "Not ready, or shedding load."),
    504: ("GatewayTimeout", "The target did not answer in time."),
}

_BODY_ERRORS = (400, 413, 415)
# Which errors an operation of each kind can answer besides its own: `_errors` adds these.
_AUTH_ERRORS = {ADMIN: (401, 403), API: (401, 403), METRICS: (401,), PUBLIC: (), SESSION: (403,)}
_V1_ERRORS = (404, 429, 502, 503, 504)

# -- admin objects --------------------------------------------------------------------------------------------

ORG = obj(
    {"id": ID, "object": const("org"), "name": STRING, "created_at": TIMESTAMP},
    {"providers_may_enroll": {**BOOLEAN, "description": "Whether its providers may create enrollment tokens."}},
)
API_KEY = obj(
    {
        "id": ID,
        "object": const("api_key"),
        "org": STRING,
        "org_id": ID,
        "name": STRING,
        "prefix": STRING,
        "models": STRINGS,
        "expires_at": nullable(TIMESTAMP),
        "revoked_at": nullable(TIMESTAMP),
        "created_at": TIMESTAMP,
    },
    {
        "owner_account_id": {**nullable(ID), "description": "The developer account the key belongs to, if any."},
        "console": {**BOOLEAN, "description": "An account's console (playground) key, never shown."},
    },
)
NEW_API_KEY = {"allOf": [ref("ApiKey"), obj({"key": {**STRING, "description": "The key itself, shown only here."}})]}
ROTATED_ADMIN_KEY = obj(
    {"id": ID, "object": const("admin_key"), "key": STRING, "created_at": TIMESTAMP, "revoked": STRINGS}
)

_POLICY_TYPES = {f.name: "integer" if f.type in ("int", int) else "number" for f in fields(FailoverPolicy)}
# What server.routing.failover.validate_overrides takes: known fields only, each a non-negative number or null.
POLICY = {
    "type": ["object", "null"],
    "properties": {name: {"type": [kind, "null"], "minimum": 0} for name, kind in _POLICY_TYPES.items()},
    "additionalProperties": False,
}
PROVIDER = obj(
    {
        "id": ID,
        "object": const("provider"),
        "org": STRING,
        "org_id": ID,
        "name": STRING,
        "base_url": STRING,
        "api_keys": {"type": "array", "items": obj({"id": ID, "hint": STRING})},
        "models": {
            "type": "array",
            "items": obj({"alias": STRING, "upstream": STRING, "price_in": PRICE, "price_out": PRICE}),
        },
        "policy": obj(),
        "continuation": STRING,
        "responses": nullable(BOOLEAN),
        "egress": obj(additionalProperties=STRING),
        "created_at": TIMESTAMP,
    }
)
# A model a provider serves: "alias", "alias=upstream-name", or an object with its own prices.
PROVIDER_MODEL = {
    "anyOf": [
        STRING,
        obj({"alias": STRING}, {"upstream": ANY_JSON, "price_in": PRICE, "price_out": PRICE}),
    ]
}
EGRESS_FIELDS = {
    "proxy": {**OPTIONAL_STRING, "description": 'A proxy URL, `none` (direct) or `env`; "" removes it.'},
    "ca_file": {**OPTIONAL_STRING, "description": 'An absolute path on the plane\'s machine; "" removes it.'},
    "client_cert": {**OPTIONAL_STRING, "description": 'An absolute path on the plane\'s machine; "" removes it.'},
    "client_key": {**OPTIONAL_STRING, "description": 'An absolute path on the plane\'s machine; "" removes it.'},
}
_PROVIDER_SETTINGS: dict[str, Any] = {
    "policy": POLICY,
    # "" and null: the default (a new provider) or unchanged (an update).
    "continuation": {"type": ["string", "null"], "enum": [*PROVIDER_CONTINUATIONS, "", None]},
    **EGRESS_FIELDS,
    "responses": {**nullable(BOOLEAN), "description": "Whether the provider serves /v1/responses itself."},
}
ADD_PROVIDER = request_body(
    {
        "org": NON_EMPTY,
        "name": NON_EMPTY,
        "base_url": {
            "type": "string",
            "pattern": "^https?://[^/?#\\s]",
            "description": "e.g. https://api.openai.com/v1",
        },
        "models": {"type": "array", "items": PROVIDER_MODEL, "minItems": 1},
    },
    {
        "api_keys": STRINGS,
        "price_in": PRICE,
        "price_out": PRICE,
        **_PROVIDER_SETTINGS,
    },
)
UPDATE_PROVIDER = request_body(optional=_PROVIDER_SETTINGS)

ROUTE = obj(
    {
        "id": ID,
        "object": const("route"),
        "org": STRING,
        "org_id": ID,
        "model": STRING,
        "strategy": enum(STRATEGIES),
        "targets": STRINGS,
        "fallbacks": STRINGS,
        "hedge": OPTIONAL_STRING,
        "created_at": TIMESTAMP,
    }
)
SET_ROUTE = request_body(
    {"org": NON_EMPTY, "model": {**NON_EMPTY, "description": "A model name or a glob."}},
    {
        "strategy": {"type": ["string", "null"], "enum": [*STRATEGIES, "", None]},
        "targets": {**STRINGS, "description": "Provider names (or `nodes`), each optionally `name=weight`."},
        "fallbacks": {**STRINGS, "description": "Models tried, in order, when every target of this one failed."},
        "hedge": {
            "anyOf": [{"type": "null"}, {"type": "number", "exclusiveMinimum": 0}, NON_EMPTY],
            "description": "`off`, `auto` or seconds (a number, or a string of one); null: the plane's default.",
        },
    },
)
CATALOG_MODEL = obj(
    {
        "model": STRING,
        "org": STRING,
        "targets": {
            "type": "array",
            "items": obj(
                {"id": STRING, "kind": STRING, "upstream_model": STRING, "price_in": PRICE, "price_out": PRICE}
            ),
        },
    }
)

_COUNT: Schema = {"type": "integer", "minimum": 0}
_USD: Schema = {"type": ["number", "null"], "description": "USD; null when what it sums was unpriced."}
USAGE_ROW = obj(
    {
        "requests": _COUNT,
        "errors": _COUNT,
        "failed_attempts": _COUNT,
        "prompt_tokens": _COUNT,
        "completion_tokens": _COUNT,
        "cost_usd": _USD,
        "unpriced_requests": _COUNT,
        "cache_hits": _COUNT,
        "latency_p50_ms": {"type": ["number", "null"]},
        "latency_p95_ms": {"type": ["number", "null"]},
    },
    {group: STRING for group in GROUPS},
)
EARNINGS_ROW = obj(
    {
        "requests": _COUNT,
        "prompt_tokens": _COUNT,
        "completion_tokens": _COUNT,
        "earned_usd": _USD,
        "unpriced_requests": _COUNT,
    },
    {"node_id": STRING, "node": STRING, "org": STRING},
)
AUDIT_ENTRY = obj(
    {
        "id": INTEGER,
        "object": const("audit_entry"),
        "created_at": TIMESTAMP,
        "actor": STRING,
        "action": STRING,
        "target": STRING,
        "before": ANY_JSON,
        "after": ANY_JSON,
        "request_id": STRING,
        "hash": STRING,
    }
)
AUDIT_VERDICT = obj({"ok": BOOLEAN, "entries": _COUNT, "first_broken": nullable(INTEGER), "reason": STRING})

_LIMIT_VALUES = {
    name: {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_LIMIT}
    if name in INTEGER_LIMITS
    else {"type": ["number", "null"], "minimum": 0}
    for name in LIMIT_FIELDS
}
LIMITS = obj(
    {
        "id": ID,
        "object": const("limits"),
        "scope": STRING,
        "org": STRING,
        "org_id": ID,
        "key_id": nullable(ID),
        **_LIMIT_VALUES,
        "updated_at": TIMESTAMP,
    },
    # Not on the limits a removal answers with: they no longer apply.
    {"usage": {**obj(), "description": "What the live counters say now (remaining requests/tokens, used quotas)."}},
)
# Exactly one of org or key, at least one limit (null lifts it), nothing else.
SET_LIMITS = {
    **request_body(
        optional={"org": {"type": "string", "minLength": 1}, "key": {"type": "string", "minLength": 1}, **_LIMIT_VALUES}
    ),
    "oneOf": [{"required": ["org"], "not": {"required": ["key"]}}, {"required": ["key"], "not": {"required": ["org"]}}],
    "anyOf": [{"required": [name]} for name in LIMIT_FIELDS],
}
CACHE_POLICY = obj(
    {
        "object": const("cache_policy"),
        "org": STRING,
        "org_id": ID,
        "mode": enum(CACHE_MODES),
        "ttl_s": INTEGER,
        "entries": nullable(_COUNT),
        "bytes": nullable(_COUNT),
    }
)
SET_CACHE = request_body(
    {"org": NON_EMPTY},
    {
        "mode": {"type": ["string", "null"], "enum": [*CACHE_MODES, "", None]},
        "ttl_s": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_LIMIT},
    },
)
CACHE_CLEAR = obj({"object": const("cache_clear"), "id": STRING, "removed": _COUNT})
PRICE_CHANGE = obj(
    {
        "id": INTEGER,
        "object": const("price"),
        "org": STRING,
        "provider": STRING,
        "model": STRING,
        "price_in": PRICE,
        "price_out": PRICE,
        "effective_from": TIMESTAMP,
    }
)
SET_PRICE = request_body(
    {"provider": NON_EMPTY, "model": NON_EMPTY},
    {
        "org": {**OPTIONAL_STRING, "description": "Needed when the provider's name is used in several orgs."},
        "price_in": PRICE,
        "price_out": PRICE,
    },
)

NODE_TOKEN = obj(
    {
        "id": ID,
        "object": const("node_token"),
        "org": STRING,
        "org_id": ID,
        "uses_left": _COUNT,
        "expires_at": nullable(TIMESTAMP),
        "revoked_at": nullable(TIMESTAMP),
        "labels": obj(additionalProperties=STRING),
        "replaces": nullable(ID),
        "created_at": TIMESTAMP,
    },
    {"created_by": {**OPTIONAL_STRING, "description": "The account that created it, if one did."}},
)
NEW_NODE_TOKEN = {
    "allOf": [
        ref("NodeToken"),
        obj({"token": {**STRING, "description": "The enrollment token to give the agent, shown only here."}}),
    ]
}
CREATE_NODE_TOKEN = request_body(
    {"org": NON_EMPTY},
    {
        "ttl_s": {"type": ["number", "null"], "minimum": 0.1, "maximum": 10 * 365 * 86400},
        "uses": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
        "labels": {
            "anyOf": [obj(additionalProperties=STRING), {"not": {"type": ["object"]}, "enum": [None, False, 0, ""]}],
            "description": "Labels the node gets; null (or another empty value) for none.",
        },
        "replace": {**OPTIONAL_STRING, "description": "A node (id or name) the enrolling machine takes over."},
        "planes": {
            "type": "array",
            "items": {"type": "string", "maxLength": PLANE_ADDRESS_MAX_CHARS, "pattern": r"^[^\s,]+:[0-9]+$"},
            "description": f"Node service addresses (HOST:PORT) the token carries; at most {PLANES_MAX} distinct.",
        },
    },
)
NODE = obj(
    {
        "id": ID,
        "object": const("node"),
        "org": STRING,
        "org_id": ID,
        "name": STRING,
        "labels": obj(additionalProperties=STRING),
        "drained": BOOLEAN,
        "revoked_at": nullable(TIMESTAMP),
        "enrolled_at": nullable(TIMESTAMP),
        "created_at": TIMESTAMP,
        "state": {**STRING, "description": "ready, busy, draining... from the live session; offline or revoked."},
    },
    {
        "owner_account_id": {**nullable(ID), "description": "The provider account that enrolled it, if one did."},
        "plane": STRING,
        "agent_version": STRING,
        "os": STRING,
        "mode": enum(("idle-only", "always-on")),
        "backend": OPTIONAL_STRING,
        "gpu_offload": BOOLEAN,
        "connected_at": TIMESTAMP,
        "last_heartbeat_s": NUMBER,
        "status_version": INTEGER,
        "hardware": obj(),
        "models": {"type": "array", "items": obj({"name": STRING, "slots_total": INTEGER, "slots_busy": INTEGER})},
        "issues": {"type": "array", "items": obj({"code": STRING, "message": STRING, "model": STRING})},
    },
)

# -- accounts, sessions and scoped admin tokens (server.accounts) ---------------------------------------------

ACCOUNT = obj(
    {
        "id": ID,
        "object": const("account"),
        "email": STRING,
        "name": STRING,
        "role": enum(ROLES),
        "org_id": nullable(ID),
        "org": OPTIONAL_STRING,
        "disabled": BOOLEAN,
        "created_at": TIMESTAMP,
    }
)
SIGNED_IN = obj(
    {
        "account": ref("Account"),
        "csrf_token": {**STRING, "description": f"Send it back as {CSRF_HEADER} on every request but GET."},
    }
)
PRINCIPAL = obj(
    {
        "id": ID,
        "object": const("principal"),
        "kind": enum(("admin_key", "admin_token", "session")),
        "email": OPTIONAL_STRING,
        "name": OPTIONAL_STRING,
        "role": enum(ROLES),
        "org_id": nullable(ID),
    },
    {"csrf_token": {**STRING, "description": "With a session only."}},
)
ADMIN_TOKEN = obj(
    {
        "id": ID,
        "object": const("admin_token"),
        "name": STRING,
        "role": enum(ROLES),
        "org_id": nullable(ID),
        "account_id": nullable(ID),
        "created_by": STRING,
        "expires_at": nullable(TIMESTAMP),
        "revoked_at": nullable(TIMESTAMP),
        "created_at": TIMESTAMP,
    }
)
NEW_ADMIN_TOKEN = {
    "allOf": [ref("AdminToken"), obj({"token": {**STRING, "description": "The token itself, shown only here."}})]
}
INVITATION = obj(
    {
        "id": ID,
        "object": const("invitation"),
        "email": STRING,
        "role": enum(ROLES),
        "org_id": nullable(ID),
        "expires_at": TIMESTAMP,
        "created_at": TIMESTAMP,
        "url": {**STRING, "description": "The console page that takes it, the token in the fragment."},
        "token": {**STRING, "description": "The invitation's token, shown only here."},
    }
)
ORG_SETTINGS = obj(
    {"id": ID, "object": const("org"), "name": STRING, "providers_may_enroll": BOOLEAN, "created_at": TIMESTAMP}
)
# What server.accounts.store.normalize_email takes, around the whitespace it strips (it also refuses control
# characters, which JSON Schema's patterns cannot name portably). Not the `email` format: that refuses an
# internationalised address, which the plane takes.
_EMAIL: Schema = {"type": "string", "pattern": r"^\s*[^@\s]{1,64}@[^@\s]{1,190}\s*$"}
_PASSWORD: Schema = {"type": "string", "minLength": PASSWORD_MIN, "maxLength": PASSWORD_MAX}
_ACCOUNT_NAME: Schema = {"type": "string", "maxLength": accounts_http.NAME_MAX_CHARS}
# An account's, invitation's or token's org: `org_id` (an id or a name; `org` is taken too); none for a plane admin.
_ORG_OF_ROLE: dict[str, Schema] = {
    "org_id": {**OPTIONAL_STRING, "description": "The org (id or name); left out for a plane admin."},
    "org": OPTIONAL_STRING,
}
LOGIN = request_body({"email": STRING, "password": STRING})
ACCEPT_INVITATION = request_body(
    {"token": {"type": "string", "minLength": 1}, "password": _PASSWORD}, {"name": _ACCOUNT_NAME}
)
CREATE_ACCOUNT = request_body(
    {"email": _EMAIL, "role": enum(ROLES), "password": _PASSWORD}, {"name": _ACCOUNT_NAME, **_ORG_OF_ROLE}
)
UPDATE_ACCOUNT = request_body(
    optional={
        "name": _ACCOUNT_NAME,
        "role": enum(ROLES),
        **_ORG_OF_ROLE,
        "disabled": BOOLEAN,
        "password": _PASSWORD,
    },
)
CREATE_INVITATION = request_body(
    {"email": _EMAIL, "role": enum(ROLES)},
    {
        **_ORG_OF_ROLE,
        "ttl_s": {"type": ["number", "null"], "minimum": 60, "maximum": accounts_http.INVITATION_MAX_TTL_S},
    },
)
CREATE_ADMIN_TOKEN = request_body(
    {"role": enum(ROLES)},
    {
        **_ORG_OF_ROLE,
        "account_id": {**OPTIONAL_STRING, "description": "The account a developer's or provider's token acts for."},
        "name": _ACCOUNT_NAME,
        "expires_at": {**nullable(TIMESTAMP), "description": "ISO 8601; or give `ttl_s`; neither: no expiry."},
        "ttl_s": {"type": ["number", "null"], "minimum": 1, "maximum": 10 * 365 * 86400},
    },
)

# -- the console's own endpoints (server.console) -------------------------------------------------------------

_PERCENTILES = {
    f"{kind}_p{q}_ms": {"type": ["number", "null"]} for kind in ("latency", "ttft") for q in console_stats.QUANTILES
}
_STATS_FIGURES = {
    "requests": _COUNT,
    "errors": _COUNT,
    "prompt_tokens": _COUNT,
    "completion_tokens": _COUNT,
    "cost_usd": _USD,
}
CONSOLE_STATS = obj(
    {
        "object": const("console.stats"),
        "period": enum(tuple(console_stats.PERIODS)),
        "by": enum(console_stats.GROUPS),
        "since": TIMESTAMP,
        "until": TIMESTAMP,
        "bucket_s": INTEGER,
        "totals": obj(_STATS_FIGURES, _PERCENTILES),
        "series": {"type": "array", "items": obj({"t": TIMESTAMP, **_STATS_FIGURES}, _PERCENTILES)},
        "groups": {"type": "array", "items": obj({"name": STRING, **_STATS_FIGURES}, _PERCENTILES)},
        "live": obj({"nodes": obj(additionalProperties=INTEGER), "slots_busy": _COUNT, "slots_total": _COUNT}),
    }
)
CONSOLE_INFO = obj(
    {
        "object": const("console.info"),
        "grpc_port": INTEGER,
        "grpc_insecure": BOOLEAN,
        "failover_fields": {"type": "array", "items": obj({"name": STRING, "default": NUMBER, "help": STRING})},
        "strategies": STRINGS,
        "cache_modes": STRINGS,
        "limit_fields": STRINGS,
    }
)
CONSOLE_REQUEST = obj(
    {
        "object": const("console.request"),
        "request_id": STRING,
        "created_at": TIMESTAMP,
        "model": STRING,
        "target": STRING,
        "node_id": OPTIONAL_STRING,
        "status": INTEGER,
        "attempts": INTEGER,
        "stream": BOOLEAN,
        "prompt_tokens": INTEGER,
        "completion_tokens": INTEGER,
        "cost_usd": {"type": ["number", "null"]},
        "latency_ms": {"type": ["number", "null"]},
        "ttft_ms": {"type": ["number", "null"]},
        "cache": OPTIONAL_STRING,
    }
)
PROVIDER_TEST = obj(
    {
        "object": const("provider.test"),
        "provider": STRING,
        "model": STRING,
        "ok": BOOLEAN,
        "status": INTEGER,
        "latency_ms": NUMBER,
    },
    {"error": {**STRING, "description": "What went wrong (when not ok)."}, "answered_model": OPTIONAL_STRING},
)

# -- OpenAI objects (answers; the requests are OpenAI's own schemas) ------------------------------------------

_USAGE = obj(optional={"prompt_tokens": INTEGER, "completion_tokens": INTEGER, "total_tokens": INTEGER})
CHAT_COMPLETION = obj(
    {
        "id": STRING,
        "object": const("chat.completion"),
        "created": INTEGER,
        "model": STRING,
        "choices": {
            "type": "array",
            "items": obj({"index": INTEGER, "message": obj({"role": STRING}), "finish_reason": OPTIONAL_STRING}),
        },
    },
    {"usage": _USAGE},
)
COMPLETION = obj(
    {
        "id": STRING,
        "object": const("text_completion"),
        "created": INTEGER,
        "model": STRING,
        "choices": {"type": "array", "items": obj({"index": INTEGER, "text": STRING})},
    },
    {"usage": _USAGE},
)
EMBEDDINGS = obj(
    {
        "object": const("list"),
        "model": STRING,
        "data": {
            "type": "array",
            "items": obj(
                {
                    "object": const("embedding"),
                    "index": INTEGER,
                    "embedding": {"anyOf": [{"type": "array", "items": NUMBER}, STRING]},
                }
            ),
        },
    },
    {"usage": _USAGE},
)
RESPONSE = obj(
    {"id": STRING, "object": const("response"), "created_at": NUMBER, "model": STRING, "output": {"type": "array"}},
    {"status": STRING, "usage": nullable(obj())},
)
MODEL = obj({"id": STRING, "object": const("model"), "created": INTEGER, "owned_by": STRING})

# What the plane holds a /v1 body to besides OpenAI's schema (server.api.validation, server.responses.request): it
# routes on `model`, so that is a non-empty string; `tool_choice` needs `tools`; /v1/responses stores nothing.
_MODEL_NAMED: Schema = {"required": ["model"], "properties": {"model": NON_EMPTY}}
_TOOL_CHOICE_NEEDS_TOOLS: Schema = {
    "if": {"required": ["tool_choice"], "properties": {"tool_choice": {"not": {"type": "null"}}}},
    "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}},
}
_STATELESS: Schema = {
    "properties": {
        "previous_response_id": {"type": "null"},
        "conversation": {"type": "null"},
        "prompt": {"type": "null"},
        "store": {"enum": [False, None]},
        "background": {"enum": [False, None]},
    }
}
PLANE_RULES: dict[str, tuple[Schema, ...]] = {
    "chat/completions": (_MODEL_NAMED, _TOOL_CHOICE_NEEDS_TOOLS),
    "completions": (_MODEL_NAMED,),
    "embeddings": (_MODEL_NAMED,),
    "responses": (_MODEL_NAMED, _STATELESS),
}


def openai_body(endpoint: str) -> Schema:
    """OpenAI's request schema for the endpoint, with the plane's own rules beside it."""
    return {"allOf": [ref(COMPONENTS[endpoint]), *PLANE_RULES[endpoint]]}


# Each event of a stream: `data` is a JSON chunk (or an error envelope), the last one `[DONE]`.
SSE_EVENT = obj({"data": STRING}, {"event": STRING, "id": STRING, "retry": INTEGER})

# The example each /v1 body gets: the model the plane's own tests serve, so an example request reaches a target.
EXAMPLE_MODEL = "gpt-4o-mini"

# -- the operations -------------------------------------------------------------------------------------------

_AUTH, _ACCOUNTS, _CONSOLE = "sign-in", "accounts and admin tokens", "console"
_ORGS, _KEYS, _PROVIDERS, _ROUTING, _POLICY, _NODES, _REPORTS = (
    "orgs",
    "keys",
    "providers",
    "routing",
    "limits, cache and prices",
    "nodes",
    "usage and audit",
)
_OPENAI, _OPS, _DOCS = "OpenAI API", "operations", "documentation"


def _v1(endpoint: str, summary: str, answer: Schema, *, stream: bool, example: Schema) -> Operation:
    """A /v1 generation endpoint: OpenAI's request schema; an answer as JSON, or as server-sent events."""
    ok: Schema = {
        "description": "The answer; with `stream: true`, server-sent events of chunks ending in `data: [DONE]`.",
        "content": {"application/json": {"schema": answer}},
    }
    if stream:
        ok["content"]["text/event-stream"] = {"schema": SSE_EVENT}
    return Operation(
        "post",
        f"/v1/{endpoint}",
        summary,
        _OPENAI,
        API,
        {200: ok},
        body=openai_body(endpoint),
        query=(CACHE_HEADER, ORG_HEADER),
        errors=(*_V1_ERRORS, 422),
        body_example={"model": EXAMPLE_MODEL, **example},
    )


def _stored_response(method: str, path: str, summary: str) -> Operation:
    return Operation(
        method,
        path,
        summary,
        _OPENAI,
        API,
        {},
        errors=(404,),
        description="The plane stores no responses: always 404, naming what to do instead.",
    )


OPERATIONS: tuple[Operation, ...] = (
    # -- OpenAI ------------------------------------------------------------------------------------------------
    _v1(
        "chat/completions",
        "Create a chat completion",
        ref("ChatCompletion"),
        stream=True,
        example={"messages": [{"role": "user", "content": "Say hello"}]},
    ),
    _v1(
        "completions",
        "Create a completion (legacy)",
        ref("Completion"),
        stream=True,
        example={"prompt": "Say hello"},
    ),
    _v1(
        "embeddings",
        "Create embeddings",
        ref("Embeddings"),
        stream=False,
        example={"input": "hello"},
    ),
    _v1(
        "responses",
        "Create a response (stateless)",
        ref("Response"),
        stream=True,
        example={"input": "Say hello"},
    ),
    _stored_response("get", "/v1/responses/{response_id}", "Retrieve a stored response (none are stored)"),
    _stored_response("delete", "/v1/responses/{response_id}", "Delete a stored response (none are stored)"),
    _stored_response("post", "/v1/responses/{response_id}/cancel", "Cancel a response (none run in background)"),
    _stored_response("get", "/v1/responses/{response_id}/input_items", "List a stored response's input items"),
    Operation("get", "/v1/models", "List the models this key may call", _OPENAI, API, {200: listing(ref("Model"))}),
    Operation("get", "/v1/models/{model}", "Retrieve a model", _OPENAI, API, {200: ref("Model")}, errors=(404,)),
    # -- operations --------------------------------------------------------------------------------------------
    Operation("get", "/healthz", "Liveness", _OPS, PUBLIC, {200: obj({"status": const("ok")})}),
    Operation(
        "get",
        "/readyz",
        "Readiness: snapshot loaded, storage (and Redis) reachable",
        _OPS,
        PUBLIC,
        {200: obj({"status": const("ready"), "snapshot_version": INTEGER})},
        errors=(503,),
    ),
    Operation(
        "get",
        "/metrics",
        "Prometheus metrics",
        _OPS,
        METRICS,
        {200: {"description": "Prometheus text format.", "content": {"text/plain": {"schema": STRING}}}},
    ),
    Operation("get", "/openapi.json", "This document", _DOCS, PUBLIC, {200: obj({"openapi": STRING})}),
    # -- sign-in, accounts, scoped admin tokens ----------------------------------------------------------------
    Operation(
        "post",
        "/auth/login",
        "Sign in: starts a console session (cookie) and returns its CSRF token",
        _AUTH,
        PUBLIC,
        {200: ref("SignedIn")},
        body=LOGIN,
        errors=(401, 429),
        description=(
            f"Sets the `{SESSION_COOKIE}` cookie (HttpOnly, SameSite=Strict; Secure over TLS). One answer for an "
            "unknown email and a wrong password (401); throttled per email and per client address (429)."
        ),
    ),
    Operation(
        "post",
        "/auth/logout",
        "Sign out: ends the session everywhere and clears the cookie",
        _AUTH,
        SESSION,
        {204: None},
        description="204 also when there is no live session: the cookie is cleared all the same.",
    ),
    Operation(
        "post",
        "/auth/invitations/accept",
        "Accept an invitation: creates the account and signs it in",
        _AUTH,
        PUBLIC,
        {201: ref("SignedIn")},
        body=ACCEPT_INVITATION,
        errors=(409,),
    ),
    Operation(
        "post",
        "/auth/password",
        "Change the calling account's password: ends its other sessions, answers as sign-in does",
        _AUTH,
        ADMIN,
        {200: ref("SignedIn")},
        body=request_body({"current_password": STRING, "new_password": _PASSWORD}),
        errors=(429,),
        description="403 when the current password is not right, or the caller is no account (an admin key).",
    ),
    Operation(
        "get", "/admin/v1/me", "Who is calling (and the session's CSRF token)", _ACCOUNTS, ADMIN, {200: PRINCIPAL}
    ),
    Operation("get", "/admin/v1/accounts", "List accounts", _ACCOUNTS, ADMIN, {200: listing(ref("Account"))}),
    Operation(
        "post",
        "/admin/v1/accounts",
        "Create an account",
        _ACCOUNTS,
        ADMIN,
        {201: ref("Account")},
        body=CREATE_ACCOUNT,
        errors=(404, 409),
    ),
    Operation(
        "patch",
        "/admin/v1/accounts/{id}",
        "Change an account (name, role and org, disabled, password)",
        _ACCOUNTS,
        ADMIN,
        {200: ref("Account")},
        body=UPDATE_ACCOUNT,
        errors=(404,),
    ),
    Operation(
        "delete", "/admin/v1/accounts/{id}", "Remove an account", _ACCOUNTS, ADMIN, {200: ref("Account")}, errors=(404,)
    ),
    Operation(
        "post",
        "/admin/v1/invitations",
        "Invite someone: a link, shown once, that creates their account",
        _ACCOUNTS,
        ADMIN,
        {201: INVITATION},
        body=CREATE_INVITATION,
        errors=(404, 409),
    ),
    Operation(
        "get", "/admin/v1/admin-tokens", "List scoped admin tokens", _ACCOUNTS, ADMIN, {200: listing(ref("AdminToken"))}
    ),
    Operation(
        "post",
        "/admin/v1/admin-tokens",
        f"Create a scoped admin token (`{ADMIN_TOKEN_PREFIX}...`, shown once)",
        _ACCOUNTS,
        ADMIN,
        {201: NEW_ADMIN_TOKEN},
        body=CREATE_ADMIN_TOKEN,
        errors=(404,),
    ),
    Operation(
        "post",
        "/admin/v1/admin-tokens/{id}/revoke",
        "Revoke a scoped admin token",
        _ACCOUNTS,
        ADMIN,
        {200: ref("AdminToken")},
        errors=(404,),
    ),
    # -- the console's own ---------------------------------------------------------------------------------------
    Operation(
        "get",
        "/admin/v1/console/stats",
        "Requests, errors, latency and time-to-first-token percentiles and cost over a period, as series",
        _CONSOLE,
        ADMIN,
        {200: CONSOLE_STATS},
        query=(
            Param("org", "Only this org (id or name); 400 when there is none."),
            Param("period", "The period charted (default 24h).", enum(tuple(console_stats.PERIODS))),
            Param("by", "The grouping of the table (default model).", enum(console_stats.GROUPS)),
        ),
    ),
    Operation(
        "get",
        "/admin/v1/console/info",
        "What the console's forms offer: strategies, cache modes, limit and failover fields",
        _CONSOLE,
        ADMIN,
        {200: CONSOLE_INFO},
    ),
    Operation(
        "get",
        "/admin/v1/console/requests/{request_id}",
        "One request's usage row (the playground's route, attempts, latency, cost)",
        _CONSOLE,
        ADMIN,
        {200: CONSOLE_REQUEST},
        query=(Param("org", "Only in this org (id or name)."),),
        errors=(404,),
    ),
    Operation(
        "post",
        "/admin/v1/providers/{ref}/test",
        "Test a provider: one chat completion of one token, with its own keys and egress",
        _PROVIDERS,
        ADMIN,
        {200: PROVIDER_TEST},
        query=(ORG_QUERY,),
        errors=(404,),
    ),
    # -- orgs and keys -----------------------------------------------------------------------------------------
    Operation("get", "/admin/v1/orgs", "List orgs", _ORGS, ADMIN, {200: listing(ref("Org"))}),
    Operation(
        "post",
        "/admin/v1/orgs",
        "Create an org",
        _ORGS,
        ADMIN,
        {201: ref("Org")},
        body=request_body({"name": ORG_NAME}),
        errors=(409,),
    ),
    Operation(
        "patch",
        "/admin/v1/orgs/{ref}",
        "Change an org's settings",
        _ORGS,
        ADMIN,
        {200: ORG_SETTINGS},
        body=request_body({"providers_may_enroll": BOOLEAN}),
        errors=(404,),
    ),
    Operation(
        "get",
        "/admin/v1/keys",
        "List API keys",
        _KEYS,
        ADMIN,
        {200: listing(ref("ApiKey"))},
        query=(ORG_QUERY,),
        errors=(404,),
    ),
    Operation(
        "post",
        "/admin/v1/keys",
        "Create an API key (shown once)",
        _KEYS,
        ADMIN,
        {201: NEW_API_KEY},
        body=request_body(
            {"org": NON_EMPTY},
            {
                "name": OPTIONAL_STRING,
                "owner_account_id": {**OPTIONAL_STRING, "description": "Give the key to an account of the org."},
                "models": {**STRINGS, "description": "The models the key may call; empty: all the org serves."},
                "expires_at": {**nullable(TIMESTAMP), "description": "ISO 8601, in the future; UTC without offset."},
            },
        ),
        errors=(404,),
    ),
    Operation(
        "post", "/admin/v1/keys/{id}/revoke", "Revoke an API key", _KEYS, ADMIN, {200: ref("ApiKey")}, errors=(404,)
    ),
    Operation(
        "post",
        "/admin/v1/admin-key/rotate",
        "Replace the admin key with a new one (shown once)",
        _KEYS,
        ADMIN,
        {201: ROTATED_ADMIN_KEY},
        errors=(409,),
        description="409 when the admin key comes from the plane's configuration (HATCHWAY_ADMIN_KEY).",
    ),
    # -- providers ---------------------------------------------------------------------------------------------
    Operation(
        "get",
        "/admin/v1/providers",
        "List providers",
        _PROVIDERS,
        ADMIN,
        {200: listing(ref("Provider"))},
        query=(ORG_QUERY,),
        errors=(404,),
    ),
    Operation(
        "post",
        "/admin/v1/providers",
        "Add a provider",
        _PROVIDERS,
        ADMIN,
        {201: ref("Provider")},
        body=ADD_PROVIDER,
        errors=(404, 409),
    ),
    Operation(
        "patch",
        "/admin/v1/providers/{ref}",
        "Change a provider's policy, continuation, egress or Responses support",
        _PROVIDERS,
        ADMIN,
        {200: ref("Provider")},
        body=UPDATE_PROVIDER,
        query=(ORG_QUERY,),
        errors=(404,),
    ),
    Operation(
        "delete",
        "/admin/v1/providers/{ref}",
        "Remove a provider",
        _PROVIDERS,
        ADMIN,
        {200: ref("Provider")},
        query=(ORG_QUERY,),
        errors=(404,),
    ),
    # -- routing -----------------------------------------------------------------------------------------------
    Operation(
        "get",
        "/admin/v1/routes",
        "List routing rules",
        _ROUTING,
        ADMIN,
        {200: listing(ref("Route"))},
        query=(ORG_QUERY,),
        errors=(404,),
    ),
    Operation(
        "put",
        "/admin/v1/routes",
        "Create or replace an org's rule for a model",
        _ROUTING,
        ADMIN,
        {200: ref("Route")},
        body=SET_ROUTE,
        errors=(404,),
    ),
    Operation(
        "delete",
        "/admin/v1/routes",
        "Remove a routing rule",
        _ROUTING,
        ADMIN,
        {200: ref("Route")},
        query=(
            Param("org", "The rule's org (id or name).", NON_EMPTY, required=True),
            Param("model", "The rule's model (or glob).", NON_EMPTY, required=True),
        ),
        errors=(404,),
    ),
    Operation(
        "get",
        "/admin/v1/models",
        "What each org's keys can call, with the targets in routing order",
        _ROUTING,
        ADMIN,
        {200: listing(ref("CatalogModel"))},
        query=(ORG_QUERY,),
    ),
    # -- usage and audit ---------------------------------------------------------------------------------------
    Operation(
        "get",
        "/admin/v1/usage",
        "Requests, tokens, cost and latency, grouped",
        _REPORTS,
        ADMIN,
        {200: listing(ref("UsageRow"))},
        query=(
            ORG_QUERY,
            SINCE_QUERY,
            Param("by", f"Comma-separated groups, of {', '.join(GROUPS)} (default model)."),
        ),
        errors=(404,),
    ),
    Operation(
        "get",
        "/admin/v1/audit",
        "The audit log",
        _REPORTS,
        ADMIN,
        {200: listing(ref("AuditEntry"))},
        query=(SINCE_QUERY,),
    ),
    Operation(
        "get", "/admin/v1/audit/verify", "Verify the audit log's hash chain", _REPORTS, ADMIN, {200: AUDIT_VERDICT}
    ),
    Operation(
        "get",
        "/admin/v1/earnings",
        "What nodes served and earned at their own prices",
        _REPORTS,
        ADMIN,
        {200: listing(ref("EarningsRow"))},
        query=(ORG_QUERY, SINCE_QUERY, Param("by", "Group by node or org.", enum(EARNINGS_GROUPS))),
        errors=(404,),
    ),
    # -- limits, cache, prices ---------------------------------------------------------------------------------
    Operation(
        "get",
        "/admin/v1/limits",
        "Limits and quotas, with what their live counters say",
        _POLICY,
        ADMIN,
        {200: listing(ref("Limits"))},
        query=(ORG_QUERY, Param("key", "Only this API key's limits (its id).")),
        errors=(404,),
    ),
    Operation(
        "put",
        "/admin/v1/limits",
        "Set (or lift, with null) limits of an org or a key",
        _POLICY,
        ADMIN,
        {200: ref("Limits")},
        body=SET_LIMITS,
        errors=(404,),
    ),
    Operation(
        "delete",
        "/admin/v1/limits",
        "Remove the limits of an org or a key (name exactly one)",
        _POLICY,
        ADMIN,
        {200: ref("Limits")},
        query=(ORG_QUERY, Param("key", "The API key (its id).")),
        errors=(404,),
    ),
    Operation(
        "get",
        "/admin/v1/cache",
        "Cache policies, with the entries and bytes each org holds",
        _POLICY,
        ADMIN,
        {200: listing(ref("CachePolicy"))},
        query=(ORG_QUERY,),
        errors=(404,),
    ),
    Operation(
        "put",
        "/admin/v1/cache",
        "Set an org's cache policy",
        _POLICY,
        ADMIN,
        {200: ref("CachePolicy")},
        body=SET_CACHE,
        errors=(404,),
    ),
    Operation(
        "delete",
        "/admin/v1/cache",
        "Drop cached answers: one org's, or all",
        _POLICY,
        ADMIN,
        {200: CACHE_CLEAR},
        query=(ORG_QUERY,),
        errors=(404,),
        description="Without `org`, every org's. A body is refused (400): an org named there would clear them all.",
    ),
    Operation(
        "get",
        "/admin/v1/prices",
        "Price history",
        _POLICY,
        ADMIN,
        {200: listing(ref("Price"))},
        query=(ORG_QUERY, Param("provider", "Only this provider (its name).")),
        errors=(404,),
    ),
    Operation(
        "put",
        "/admin/v1/prices",
        "Change a model's price from now on",
        _POLICY,
        ADMIN,
        {200: ref("Price")},
        body=SET_PRICE,
        errors=(404,),
    ),
    # -- nodes -------------------------------------------------------------------------------------------------
    Operation(
        "get",
        "/admin/v1/node-tokens",
        "List enrollment tokens",
        _NODES,
        ADMIN,
        {200: listing(ref("NodeToken"))},
        query=(ORG_QUERY,),
        errors=(404,),
    ),
    Operation(
        "post",
        "/admin/v1/node-tokens",
        "Create an enrollment token (shown once)",
        _NODES,
        ADMIN,
        {201: NEW_NODE_TOKEN},
        body=CREATE_NODE_TOKEN,
        errors=(404,),
    ),
    Operation(
        "post",
        "/admin/v1/node-tokens/{id}/revoke",
        "Revoke an enrollment token",
        _NODES,
        ADMIN,
        {200: ref("NodeToken")},
        errors=(404,),
    ),
    Operation(
        "get",
        "/admin/v1/nodes",
        "List nodes, with their live state",
        _NODES,
        ADMIN,
        {200: listing(ref("Node"))},
        query=(ORG_QUERY,),
        errors=(404,),
    ),
    Operation("get", "/admin/v1/nodes/{ref}", "Show a node", _NODES, ADMIN, {200: ref("Node")}, errors=(404,)),
    Operation(
        "post",
        "/admin/v1/nodes/{ref}/drain",
        "Drain a node (no new jobs)",
        _NODES,
        ADMIN,
        {200: ref("Node")},
        errors=(404,),
    ),
    Operation(
        "post",
        "/admin/v1/nodes/{ref}/resume",
        "Resume a drained node",
        _NODES,
        ADMIN,
        {200: ref("Node")},
        errors=(404,),
    ),
    Operation(
        "post",
        "/admin/v1/nodes/{ref}/revoke",
        "Revoke a node's credential",
        _NODES,
        ADMIN,
        {200: ref("Node")},
        errors=(404,),
    ),
)

SCHEMAS: dict[str, Schema] = {
    "Error": ERROR,
    "Org": ORG,
    "ApiKey": API_KEY,
    "Provider": PROVIDER,
    "Route": ROUTE,
    "CatalogModel": CATALOG_MODEL,
    "UsageRow": USAGE_ROW,
    "EarningsRow": EARNINGS_ROW,
    "AuditEntry": AUDIT_ENTRY,
    "Limits": LIMITS,
    "CachePolicy": CACHE_POLICY,
    "Price": PRICE_CHANGE,
    "NodeToken": NODE_TOKEN,
    "Node": NODE,
    "ChatCompletion": CHAT_COMPLETION,
    "Completion": COMPLETION,
    "Embeddings": EMBEDDINGS,
    "Response": RESPONSE,
    "Model": MODEL,
    "Account": ACCOUNT,
    "SignedIn": SIGNED_IN,
    "AdminToken": ADMIN_TOKEN,
}

SECURITY_SCHEMES: dict[str, Schema] = {
    "adminKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "The plane's global admin key (`hwa-...`): every admin operation, on every org.",
    },
    "adminToken": {
        "type": "http",
        "scheme": "bearer",
        "description": f"A scoped admin token (`{ADMIN_TOKEN_PREFIX}...`): a role, an org, until it expires.",
    },
    "apiKey": {"type": "http", "scheme": "bearer", "description": "An org's API key (`hw-...`), for /v1."},
    "session": {
        "type": "apiKey",
        "in": "cookie",
        "name": SESSION_COOKIE,
        "description": "The console's session cookie (POST /auth/login); requests other than GET need `csrf` too.",
    },
    "csrf": {
        "type": "apiKey",
        "in": "header",
        "name": CSRF_HEADER,
        "description": "The session's CSRF token (from the login answer or GET /admin/v1/me).",
    },
    "metricsToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "The plane's metrics token (or the admin key).",
    },
}


def _security(op: Operation) -> list[Schema] | None:
    # A session authenticates reads alone; anything that changes state needs its CSRF token as well.
    session: list[Schema] = [{"session": []}] if op.method == "get" else [{"session": [], "csrf": []}]
    if op.auth == ADMIN:
        return [{"adminKey": []}, {"adminToken": []}, *session]
    if op.auth == API:
        return [{"apiKey": []}, *session]
    if op.auth == METRICS:
        return [{"adminKey": []}, {"metricsToken": []}]
    if op.auth == SESSION:
        return [*session, {}]  # a request without a session is answered too
    return []


def _errors(op: Operation) -> list[int]:
    codes = set(op.errors) | set(_AUTH_ERRORS[op.auth])
    if op.body is not None:
        codes |= set(_BODY_ERRORS)
    if op.query or "{" in op.path:
        codes.add(400)
    return sorted(codes)


_SUCCESS = {200: "OK", 201: "Created (anything secret in it is shown only here).", 204: "Done; no body."}


def _response(schema: Schema | None, description: str) -> Schema:
    if schema is not None and "content" in schema:
        return schema  # a response object already
    answer: Schema = {"description": description}
    if schema is not None:
        answer["content"] = {"application/json": {"schema": schema}}
    return answer


def _path_parameters(path: str) -> list[Schema]:
    return [{"name": name, "in": "path", "required": True, "schema": STRING} for name in re.findall(r"{([^}]+)}", path)]


def _operation(op: Operation) -> Schema:
    rendered: Schema = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
        "security": _security(op),
    }
    if op.description:
        rendered["description"] = op.description
    parameters = _path_parameters(op.path) + [q.render() for q in op.query]
    if parameters:
        rendered["parameters"] = parameters
    if op.body is not None:
        media: Schema = {"schema": op.body}
        if op.body_example is not None:
            media["example"] = op.body_example
        rendered["requestBody"] = {"required": True, "content": {"application/json": media}}
    responses: Schema = {str(status): _response(schema, _SUCCESS[status]) for status, schema in op.ok.items()}
    for status in _errors(op):
        responses[str(status)] = {"$ref": f"#/components/responses/{ERROR_RESPONSES[status][0]}"}
    rendered["responses"] = responses
    return rendered


def _openai_schemas() -> dict[str, Schema]:
    """The vendored request schemas (their `$ref`s already point into `#/components/schemas`)."""
    vendored = orjson.loads(SCHEMA_FILE.read_bytes())
    schemas: dict[str, Schema] = vendored["components"]["schemas"]
    clash = schemas.keys() & SCHEMAS.keys()
    assert not clash, f"vendored schema names clash with the plane's own: {sorted(clash)}"
    return schemas


def build(operations: tuple[Operation, ...] = OPERATIONS) -> Schema:
    paths: dict[str, Schema] = {}
    for op in operations:
        methods = paths.setdefault(op.path, {})
        assert op.method not in methods, f"{op.method.upper()} {op.path} is documented twice"
        methods[op.method] = _operation(op)
    error_content = {"application/json": {"schema": ref("Error")}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Hatchway",
            "version": __version__,
            "summary": "A self-hostable OpenAI-compatible gateway: its admin API and the OpenAI subset it serves.",
            "description": (
                'Every error is the OpenAI envelope `{"error": {"message", "type", "param", "code"}}`. '
                f"Request bodies are JSON objects, nested at most {MAX_JSON_DEPTH} levels deep."
            ),
        },
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "tags": [{"name": name} for name in dict.fromkeys(op.tag for op in operations)],
        "paths": paths,
        "components": {
            "schemas": {**SCHEMAS, **_openai_schemas()},
            "responses": {
                name: {"description": description, "content": error_content}
                for name, description in ERROR_RESPONSES.values()
            },
            "securitySchemes": SECURITY_SCHEMES,
        },
    }


@functools.cache
def document() -> Schema:
    """The document, built on first use."""
    return build()


@functools.cache
def body() -> bytes:
    """The document as the JSON GET /openapi.json answers, serialised once."""
    return orjson.dumps(document())


# Routes that serve browser pages and their assets, not API operations: the console and the API reference.
_PAGES = re.compile(r"^/(console(/.*)?|api-reference(/.*)?)?$")


def is_page(path: str) -> bool:
    return bool(_PAGES.match(path))
