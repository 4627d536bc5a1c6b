"""`hatchway admin ...`: the admin API from a terminal. Tables for people, `--json` for scripts."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from server.cli.client import AdminAPIError, AdminClient
from server.policy.cache import CACHE_MODES
from server.routing.continuation import PROVIDER_CONTINUATIONS
from server.routing.failover import FailoverPolicy
from server.routing.rules import STRATEGIES
from server.usage.reports import EARNINGS_GROUPS, GROUPS


class Context:
    def __init__(self, url: str, admin_key: str, as_json: bool) -> None:
        self.url = url
        self.admin_key = admin_key
        self.as_json = as_json

    def call(self, fn: Callable[[AdminClient], Any]) -> Any:
        if not self.admin_key:
            raise click.ClickException("no admin key: set HATCHWAY_ADMIN_KEY or pass --admin-key")
        client = AdminClient(self.url, self.admin_key)
        try:
            return fn(client)
        except AdminAPIError as exc:
            raise click.ClickException(str(exc)) from exc
        finally:
            client.close()

    def show(self, doc: Any, columns: Sequence[str], *, secret: str | None = None) -> None:
        if self.as_json:
            click.echo(json.dumps(doc, indent=2))
            return
        rows = doc["data"] if isinstance(doc, dict) and "data" in doc else [doc]
        click.echo(render_table(rows, columns))
        if secret and isinstance(doc, dict) and doc.get(secret):
            click.echo(f"\n{secret} (shown once, store it now): {doc[secret]}")


def pass_context(fn: Callable[..., None]) -> Callable[..., None]:
    """Hand the command the admin Context, and accept `--json` after the subcommand as well as before it."""

    def command(ctx: Context, /, *args: Any, as_json: bool, **kwargs: Any) -> None:
        ctx.as_json = ctx.as_json or as_json
        fn(ctx, *args, **kwargs)

    functools.update_wrapper(command, fn)
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(
        click.pass_obj(command)
    )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(_cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return " ".join(f"{k}={_cell(v)}" for k, v in value.items())
    return str(value)


def render_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


_DURATION = re.compile(r"^(\d+)([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(value: str) -> timedelta | None:
    """`30d`, `12h`, `90m`, `2w`; None when the value is not a duration."""
    match = _DURATION.match(value.strip())
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))}) if match else None


def parse_since(value: str | None) -> str | None:
    """`--since`: a duration back from now (24h, 7d) or an ISO date, as the ISO date-time the API takes."""
    if not value:
        return None
    delta = parse_duration(value)
    return (datetime.now(UTC) - delta).isoformat() if delta else parse_expiry(value)


def parse_expiry(value: str) -> str:
    """`30d`, `12h`, `90m`, `2w`, or an ISO 8601 date/date-time (UTC when it has no offset)."""
    delta = parse_duration(value)
    if delta is not None:
        return (datetime.now(UTC) + delta).isoformat()
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter("use a duration like 30d / 12h / 90m or an ISO date like 2027-01-31") from exc
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).isoformat()


@click.group()
@click.option(
    "--url",
    envvar="HATCHWAY_URL",
    default="http://127.0.0.1:8080",
    show_default=True,
    help="The plane's URL (HATCHWAY_URL).",
)
@click.option(
    "--admin-key",
    envvar="HATCHWAY_ADMIN_KEY",
    default="",
    help="The admin key, or a scoped admin token hwt_... (HATCHWAY_ADMIN_KEY).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def admin(ctx: click.Context, url: str, admin_key: str, as_json: bool) -> None:
    """Administer a running plane over its admin API."""
    ctx.obj = Context(url, admin_key, as_json)


# -- orgs ------------------------------------------------------------------------------------------

ORG_COLUMNS = ("id", "name", "providers_may_enroll", "created_at")


@admin.group()
def org() -> None:
    """Organisations: they own keys, providers and (later) nodes."""


@org.command("create")
@click.argument("name")
@pass_context
def org_create(ctx: Context, name: str) -> None:
    ctx.show(ctx.call(lambda c: c.post("/orgs", {"name": name})), ORG_COLUMNS)


@org.command("list")
@pass_context
def org_list(ctx: Context) -> None:
    ctx.show(ctx.call(lambda c: c.get("/orgs")), ORG_COLUMNS)


@org.command("set")
@click.argument("org_ref", metavar="ORG")
@click.option(
    "--providers-may-enroll/--no-providers-may-enroll",
    "providers_may_enroll",
    required=True,
    help="Whether the org's provider accounts may create enrollment tokens themselves.",
)
@pass_context
def org_set(ctx: Context, org_ref: str, providers_may_enroll: bool) -> None:
    """Change an org's settings."""
    body = {"providers_may_enroll": providers_may_enroll}
    ctx.show(ctx.call(lambda c: c.patch(f"/orgs/{org_ref}", body)), ORG_COLUMNS)


# -- API keys --------------------------------------------------------------------------------------

KEY_COLUMNS = ("id", "org", "name", "prefix", "models", "expires_at", "revoked_at")


@admin.group()
def key() -> None:
    """API keys for developers (shown once, stored as hashes)."""


@key.command("create")
@click.option("--org", "org_ref", required=True, help="Org name or id.")
@click.option("--name", default="", help="A label for people.")
@click.option("--models", default="", help="Comma-separated allow-list (default: every model of the org).")
@click.option("--expires", default=None, help="30d, 12h, 90m, or an ISO date.")
@click.option("--owner", default=None, metavar="ACCOUNT_ID", help="A developer of the org the key is given to.")
@pass_context
def key_create(ctx: Context, org_ref: str, name: str, models: str, expires: str | None, owner: str | None) -> None:
    body: dict[str, Any] = {"org": org_ref, "name": name, "models": [m for m in models.split(",") if m]}
    if expires:
        body["expires_at"] = parse_expiry(expires)
    if owner:
        body["owner_account_id"] = owner
    ctx.show(ctx.call(lambda c: c.post("/keys", body)), KEY_COLUMNS, secret="key")


@key.command("list")
@click.option("--org", "org_ref", default=None, help="Only this org's keys.")
@pass_context
def key_list(ctx: Context, org_ref: str | None) -> None:
    ctx.show(ctx.call(lambda c: c.get("/keys", org=org_ref)), KEY_COLUMNS)


@key.command("revoke")
@click.argument("key_id")
@pass_context
def key_revoke(ctx: Context, key_id: str) -> None:
    ctx.show(ctx.call(lambda c: c.post(f"/keys/{key_id}/revoke", {})), KEY_COLUMNS)


# -- the admin key ---------------------------------------------------------------------------------


@admin.command("rotate-admin-key")
@pass_context
def rotate_admin_key(ctx: Context) -> None:
    """Replace the admin key with a new one, printed once; the key used here is refused from then on.

    A plane whose admin key comes from HATCHWAY_ADMIN_KEY refuses: set a new value there and restart it."""
    doc = ctx.call(lambda c: c.post("/admin-key/rotate", {}))
    if ctx.as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"Admin key (shown once, store it now): {doc['key']}")
    click.echo("The previous admin key no longer works: use the new one (HATCHWAY_ADMIN_KEY or --admin-key).")


# -- providers -------------------------------------------------------------------------------------

PROVIDER_COLUMNS = ("id", "org", "name", "base_url", "api_keys", "models")


def _provider_rows(doc: Any) -> Any:
    """Flatten nested keys and models into readable cells for the table view."""

    def flat(p: dict[str, Any]) -> dict[str, Any]:
        models = [f"{m['alias']}={m['upstream']}" if m["alias"] != m["upstream"] else m["alias"] for m in p["models"]]
        return {**p, "api_keys": [k["hint"] for k in p["api_keys"]], "models": models}

    if "data" in doc:
        return {**doc, "data": [flat(p) for p in doc["data"]]}
    return flat(doc)


def policy_options(fn: Callable[..., None]) -> Callable[..., None]:
    """One option per FailoverPolicy field (`ttft_timeout_s` -> `--ttft-timeout`), plus `--continuation`."""
    for spec in reversed(fields(FailoverPolicy)):
        flag = "--" + spec.name.removesuffix("_s").replace("_", "-")
        kind = int if spec.type in (int, "int") else float
        fn = click.option(flag, spec.name, type=kind, default=None, help=spec.metadata["help"])(fn)
    return click.option(
        "--continuation",
        type=click.Choice(PROVIDER_CONTINUATIONS),
        default=None,
        help="How the provider continues a broken stream for a rescue: regenerate (default: a new answer, used "
        "only past the delivered text when it begins with exactly that text), prefill (it continues a final "
        "assistant message), vllm (prefill with continue_final_message), none (never asked to rescue).",
    )(fn)


def _policy(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k in FailoverPolicy.field_names() and v is not None}


EGRESS_OPTIONS = {
    "proxy": "HTTP proxy for this provider, http://[user:password@]host[:port] (credentials are stored encrypted), "
    "`none` to connect directly, or `env` for HTTPS_PROXY/HTTP_PROXY/NO_PROXY (the default).",
    "ca_file": "PEM CA bundle to verify this provider with instead of the system's (a path on the plane's "
    "machine; '' removes it).",
    "client_cert": "PEM client certificate for mutual TLS (a path on the plane's machine; '' removes it).",
    "client_key": "PEM key of --client-cert, unencrypted, when the certificate file does not hold it.",
}


def egress_options(fn: Callable[..., None]) -> Callable[..., None]:
    """`--proxy`, `--ca-file`, `--client-cert`, `--client-key`: how the plane reaches the provider."""
    for name, help_text in reversed(EGRESS_OPTIONS.items()):
        fn = click.option("--" + name.replace("_", "-"), name, default=None, help=help_text)(fn)
    return fn


def _egress(options: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in options.items() if k in EGRESS_OPTIONS and v is not None}


@admin.group()
def provider() -> None:
    """Upstream OpenAI-compatible providers (their keys are encrypted at rest)."""


RESPONSES_HELP = (
    "Whether the provider serves OpenAI's /v1/responses itself (OpenAI does): /v1/responses requests are then "
    "relayed to it as they are; without it (the default) they are translated to chat completions for it."
)


@provider.command("add")
@click.argument("name")
@click.option("--org", "org_ref", required=True, help="Org name or id.")
@click.option("--base-url", required=True, help="The provider's OpenAI base URL, e.g. https://api.openai.com/v1.")
@click.option("--api-key", "api_keys", multiple=True, help="Upstream API key (repeat for several).")
@click.option("--model", "models", multiple=True, required=True, help="ALIAS[=UPSTREAM_NAME] (repeatable).")
@click.option("--price-in", type=float, default=None, help="USD per 1M prompt tokens.")
@click.option("--price-out", type=float, default=None, help="USD per 1M completion tokens.")
@click.option("--responses/--no-responses", default=None, help=RESPONSES_HELP)
@policy_options
@egress_options
@pass_context
def provider_add(
    ctx: Context,
    name: str,
    org_ref: str,
    base_url: str,
    api_keys: tuple[str, ...],
    models: tuple[str, ...],
    price_in: float | None,
    price_out: float | None,
    responses: bool | None,
    continuation: str | None,
    **limits: Any,
) -> None:
    """Add a provider; its failover limits default to the plane's settings."""
    body = {
        "org": org_ref,
        "name": name,
        "base_url": base_url,
        "api_keys": list(api_keys),
        "models": list(models),
        "price_in": price_in,
        "price_out": price_out,
        "policy": _policy(limits),
        "continuation": continuation,
        "responses": responses,
        **_egress(limits),
    }
    doc = ctx.call(lambda c: c.post("/providers", body))
    ctx.show(doc if ctx.as_json else _provider_rows(doc), PROVIDER_COLUMNS)


@provider.command("set")
@click.argument("name")
@click.option("--org", "org_ref", default=None, help="Org, when the name exists in several.")
@click.option("--responses/--no-responses", default=None, help=RESPONSES_HELP)
@policy_options
@egress_options
@pass_context
def provider_set(
    ctx: Context, name: str, org_ref: str | None, responses: bool | None, continuation: str | None, **limits: Any
) -> None:
    """Change a provider's failover limits, how it continues a broken stream or whether it serves /v1/responses
    (other settings keep their values)."""
    body: dict[str, Any] = {"policy": _policy(limits), **_egress(limits)}
    if continuation:
        body["continuation"] = continuation
    if responses is not None:
        body["responses"] = responses
    doc = ctx.call(lambda c: c.patch(f"/providers/{name}", body, org=org_ref))
    ctx.show(doc if ctx.as_json else _provider_rows(doc), PROVIDER_COLUMNS)


@provider.command("list")
@click.option("--org", "org_ref", default=None, help="Only this org's providers.")
@pass_context
def provider_list(ctx: Context, org_ref: str | None) -> None:
    doc = ctx.call(lambda c: c.get("/providers", org=org_ref))
    ctx.show(doc if ctx.as_json else _provider_rows(doc), PROVIDER_COLUMNS)


@provider.command("remove")
@click.argument("name")
@click.option("--org", "org_ref", default=None, help="Org, when the name exists in several.")
@pass_context
def provider_remove(ctx: Context, name: str, org_ref: str | None) -> None:
    doc = ctx.call(lambda c: c.delete(f"/providers/{name}", org=org_ref))
    ctx.show(doc if ctx.as_json else _provider_rows(doc), PROVIDER_COLUMNS)


# -- routing rules ---------------------------------------------------------------------------------

ROUTE_COLUMNS = ("org", "model", "strategy", "targets", "fallbacks", "hedge")


@admin.group()
def route() -> None:
    """Routing rules: which targets serve a model, in what order, and what to fall back to."""


@route.command("set")
@click.argument("model")
@click.option("--org", "org_ref", required=True, help="Org name or id.")
@click.option(
    "--strategy", type=click.Choice(STRATEGIES), default="priority", show_default=True, help="How to order targets."
)
@click.option("--targets", default="", help="Providers in priority order, e.g. a,b (weighted: a=3,b=1).")
@click.option("--fallback", "fallbacks", multiple=True, help="Model to try after every target failed (repeatable).")
@click.option(
    "--hedge",
    default=None,
    metavar="off|auto|SECONDS",
    help="When a stream's first token is this late, start the next target alongside; the first token wins "
    "(auto: the target's TTFT p95; default: the plane's `hedge` setting).",
)
@pass_context
def route_set(
    ctx: Context,
    model: str,
    org_ref: str,
    strategy: str,
    targets: str,
    fallbacks: tuple[str, ...],
    hedge: str | None,
) -> None:
    """Set the org's rule for MODEL (a name or a glob such as 'gpt-4o*')."""
    body = {
        "org": org_ref,
        "model": model,
        "strategy": strategy,
        "targets": [t for t in targets.split(",") if t.strip()],
        "fallbacks": [f for item in fallbacks for f in item.split(",") if f.strip()],
        "hedge": hedge,
    }
    ctx.show(ctx.call(lambda c: c.put("/routes", body)), ROUTE_COLUMNS)


@route.command("list")
@click.option("--org", "org_ref", default=None, help="Only this org's rules.")
@pass_context
def route_list(ctx: Context, org_ref: str | None) -> None:
    ctx.show(ctx.call(lambda c: c.get("/routes", org=org_ref)), ROUTE_COLUMNS)


@route.command("remove")
@click.argument("model")
@click.option("--org", "org_ref", required=True, help="Org name or id.")
@pass_context
def route_remove(ctx: Context, model: str, org_ref: str) -> None:
    ctx.show(ctx.call(lambda c: c.delete("/routes", org=org_ref, model=model)), ROUTE_COLUMNS)


# -- nodes -----------------------------------------------------------------------------------------

NODE_COLUMNS = ("id", "org", "name", "state", "plane", "models", "last_heartbeat_s", "agent_version")
TOKEN_COLUMNS = ("id", "org", "uses_left", "expires_at", "revoked_at", "labels", "replaces")


def _node_rows(doc: Any) -> Any:
    def flat(n: dict[str, Any]) -> dict[str, Any]:
        models = [f"{m['name']}({m['slots_busy']}/{m['slots_total']})" for m in n.get("models", [])]
        return {**n, "models": models}

    return {**doc, "data": [flat(n) for n in doc["data"]]} if "data" in doc else flat(doc)


@admin.group()
def nodes() -> None:
    """Enrolled machines running the Hatchway agent."""


@nodes.group("token")
def node_token() -> None:
    """One-time enrollment tokens (they carry the plane's CA fingerprint)."""


@node_token.command("create")
@click.option("--org", "org_ref", required=True, help="Org the enrolled nodes will belong to.")
@click.option("--ttl", default="1h", show_default=True, help="Validity: 30m, 1h, 7d...")
@click.option("--uses", type=int, default=1, show_default=True, help="How many machines may enroll with it.")
@click.option("--label", "labels", multiple=True, help="k=v label for the enrolled nodes (repeatable).")
@click.option(
    "--replace",
    "replace",
    default=None,
    metavar="NODE",
    help="The machine enrolling takes over this node (id or name): same id, its old credential stops working.",
)
@click.option(
    "--plane",
    "planes",
    multiple=True,
    metavar="HOST:PORT",
    help="A plane's node service address for the token to carry (repeatable): the agent needs no --plane, "
    "and fails over between them.",
)
@pass_context
def node_token_create(
    ctx: Context,
    org_ref: str,
    ttl: str,
    uses: int,
    labels: tuple[str, ...],
    replace: str | None,
    planes: tuple[str, ...],
) -> None:
    """A token to enroll machines as new nodes, or (--replace) as an existing node whose agent lost its config.

    An agent re-enrolling with its config file keeps its node id without --replace: it proves who it is with
    the credential it holds."""
    delta = parse_duration(ttl)
    if delta is None:
        raise click.BadParameter("use a duration like 30m, 1h or 7d", param_hint="--ttl")
    pairs = [label.partition("=") for label in labels]
    if any(not k or not sep for k, sep, _ in pairs):
        raise click.BadParameter("labels look like key=value", param_hint="--label")
    body: dict[str, Any] = {
        "org": org_ref,
        "ttl_s": delta.total_seconds(),
        "uses": uses,
        "labels": {k: v for k, _, v in pairs},
    }
    if replace:
        body["replace"] = replace
    if planes:
        body["planes"] = list(planes)
    ctx.show(ctx.call(lambda c: c.post("/node-tokens", body)), TOKEN_COLUMNS, secret="token")


@node_token.command("list")
@click.option("--org", "org_ref", default=None, help="Only this org's tokens.")
@pass_context
def node_token_list(ctx: Context, org_ref: str | None) -> None:
    ctx.show(ctx.call(lambda c: c.get("/node-tokens", org=org_ref)), TOKEN_COLUMNS)


@node_token.command("revoke")
@click.argument("token_id")
@pass_context
def node_token_revoke(ctx: Context, token_id: str) -> None:
    ctx.show(ctx.call(lambda c: c.post(f"/node-tokens/{token_id}/revoke", {})), TOKEN_COLUMNS)


@nodes.command("list")
@click.option("--org", "org_ref", default=None, help="Only this org's nodes.")
@pass_context
def nodes_list(ctx: Context, org_ref: str | None) -> None:
    doc = ctx.call(lambda c: c.get("/nodes", org=org_ref))
    ctx.show(doc if ctx.as_json else _node_rows(doc), NODE_COLUMNS)


@nodes.command("show")
@click.argument("node")
@pass_context
def nodes_show(ctx: Context, node: str) -> None:
    """Everything known about a node: hardware, models and slots, heartbeat, issues."""
    doc = ctx.call(lambda c: c.get(f"/nodes/{node}"))
    if ctx.as_json:
        ctx.show(doc, ())
        return
    for field_name in (
        "id", "name", "org", "state", "plane", "agent_version", "os", "mode", "backend", "gpu_offload",
        "last_heartbeat_s", "labels",
    ):  # fmt: skip
        click.echo(f"{field_name:>17}: {_cell(doc.get(field_name))}")
    hardware = doc.get("hardware") or {}
    for field_name in ("hostname", "cpu_model", "cpu_count", "ram_total_bytes", "nvml_status", "gpus"):
        click.echo(f"{field_name:>17}: {_cell(hardware.get(field_name))}")
    click.echo(
        render_table(
            doc.get("models", []),
            ("name", "slots_busy", "slots_total", "context", "price_in", "gpu_layers", "layers_total", "tokens_per_s"),
        )
    )
    for model in doc.get("models", []):
        if model.get("gpu_layers_reason"):
            click.echo(f"{model['name']}: gpu layers {model['gpu_layers_reason']}")
    if doc.get("issues"):
        click.echo(render_table(doc["issues"], ("code", "model", "message")))


@nodes.command("drain")
@click.argument("node")
@pass_context
def nodes_drain(ctx: Context, node: str) -> None:
    """Stop sending the node new jobs; running ones finish."""
    ctx.show(_node_rows(ctx.call(lambda c: c.post(f"/nodes/{node}/drain", {}))), NODE_COLUMNS)


@nodes.command("resume")
@click.argument("node")
@pass_context
def nodes_resume(ctx: Context, node: str) -> None:
    """Send a drained node jobs again."""
    ctx.show(_node_rows(ctx.call(lambda c: c.post(f"/nodes/{node}/resume", {}))), NODE_COLUMNS)


@nodes.command("revoke")
@click.argument("node")
@pass_context
def nodes_revoke(ctx: Context, node: str) -> None:
    """Disconnect the node and refuse its credential from now on."""
    ctx.show(_node_rows(ctx.call(lambda c: c.post(f"/nodes/{node}/revoke", {}))), NODE_COLUMNS)


@nodes.command("earnings")
@click.option("--org", "org_ref", default=None, help="Only nodes of this org.")
@click.option("--since", default=None, help="Only requests since: 24h, 7d, or an ISO date.")
@click.option("--by", type=click.Choice(EARNINGS_GROUPS), default="node", show_default=True)
@pass_context
def nodes_earnings(ctx: Context, org_ref: str | None, since: str | None, by: str) -> None:
    """Tokens each node served and what they are worth at the node's own price, per node or per owning org."""
    doc = ctx.call(lambda c: c.get("/earnings", org=org_ref, since=parse_since(since), by=by))
    columns = ("node_id", "node", "org") if by == "node" else ("org",)
    ctx.show(doc, (*columns, "requests", "prompt_tokens", "completion_tokens", "earned_usd", "unpriced_requests"))


# -- usage -----------------------------------------------------------------------------------------

USAGE_COLUMNS = (
    "requests", "errors", "failed_attempts", "cache_hits", "prompt_tokens", "completion_tokens", "cost_usd",
    "unpriced_requests", "latency_p50_ms", "latency_p95_ms",
)  # fmt: skip


def _usage_rows(doc: Any) -> Any:
    """A cost of 0 beside unpriced requests is unknown, not free (a cache hit costs 0 but prices nothing):
    the table shows it empty, as it shows a group that was all unpriced."""
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        for row in doc["data"]:
            if row.get("unpriced_requests") and not row.get("cost_usd"):
                row["cost_usd"] = None
    return doc


@admin.command("usage")
@click.option("--org", "org_ref", default=None, help="Only this org's requests.")
@click.option("--since", default=None, help="Only requests since: 24h, 7d, or an ISO date.")
@click.option("--by", "groups", multiple=True, type=click.Choice(GROUPS), help="Group by (repeatable; default: model).")
@pass_context
def usage(ctx: Context, org_ref: str | None, since: str | None, groups: tuple[str, ...]) -> None:
    """Requests, tokens, cost (null: unpriced) and latency, per group. Compare routes with --by route."""
    by = list(groups) or ["model"]
    after = parse_since(since)
    doc = ctx.call(lambda c: c.get("/usage", org=org_ref, since=after, by=",".join(by)))
    ctx.show(doc if ctx.as_json else _usage_rows(doc), (*by, *USAGE_COLUMNS))


# -- limits, cache, prices --------------------------------------------------------------------------


class LimitValue(click.ParamType[Any]):
    """A limit: a non-negative number, or `off` to lift it."""

    name = "N|off"

    def __init__(self, integer: bool) -> None:
        self.integer = integer

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None or isinstance(value, int | float):
            return value
        if str(value).lower() in ("off", "none"):
            return LIFTED
        try:
            number = int(value) if self.integer else float(value)
        except ValueError:
            self.fail(f"{value!r} is not a {'whole number' if self.integer else 'number'} or 'off'", param, ctx)
        if number < 0:
            self.fail("must not be negative", param, ctx)
        return number


# Marks a limit given as `off`: sent as null, which lifts it.
LIFTED = object()
LIMIT_OPTIONS = (
    ("rpm", True, "Requests per minute."),
    ("tpm", True, "Tokens per minute (reserved at admission: prompt estimate + max_tokens)."),
    ("concurrency", True, "Requests in flight at once."),
    ("tokens_per_day", True, "Tokens per UTC day."),
    ("tokens_per_month", True, "Tokens per UTC month."),
    ("usd_per_day", False, "Spend per UTC day, in USD."),
    ("usd_per_month", False, "Spend per UTC month, in USD."),
)
LIMIT_COLUMNS = ("org", "key_id", *(name for name, _, _ in LIMIT_OPTIONS), "usage")


def limit_options(fn: Callable[..., None]) -> Callable[..., None]:
    for name, integer, help_text in reversed(LIMIT_OPTIONS):
        flag = "--" + name.replace("_", "-")
        fn = click.option(flag, name, type=LimitValue(integer), default=None, help=f"{help_text} 'off' lifts it.")(fn)
    return fn


subject_options = (
    click.option("--org", "org_ref", default=None, help="The org (all its keys together)."),
    click.option("--key", "key_id", default=None, help="One API key, by id."),
)


def with_subject(fn: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(subject_options):
        fn = option(fn)
    return fn


def _subject(org_ref: str | None, key_id: str | None) -> dict[str, str]:
    if bool(org_ref) == bool(key_id):
        raise click.UsageError("give exactly one of --org or --key")
    return {"org": org_ref} if org_ref else {"key": key_id or ""}


@admin.group()
def limits() -> None:
    """Rate limits and quotas per org or per key: 429 when exceeded."""


@limits.command("set")
@with_subject
@limit_options
@pass_context
def limits_set(ctx: Context, org_ref: str | None, key_id: str | None, **values: Any) -> None:
    """Set limits (others keep their values), e.g. `limits set --org acme --rpm 600 --usd-per-month 50`."""
    body: dict[str, Any] = _subject(org_ref, key_id)
    chosen = {name: None if value is LIFTED else value for name, value in values.items() if value is not None}
    if not chosen:
        raise click.UsageError("give at least one limit, e.g. --rpm 60")
    doc = ctx.call(lambda c: c.put("/limits", body | chosen))
    ctx.show(doc, LIMIT_COLUMNS)


@limits.command("show")
@click.option("--org", "org_ref", default=None, help="Only this org (and its keys).")
@click.option("--key", "key_id", default=None, help="Only this key.")
@pass_context
def limits_show(ctx: Context, org_ref: str | None, key_id: str | None) -> None:
    """Limits as set, and live usage: requests/tokens left this minute, quotas used this day/month."""
    ctx.show(ctx.call(lambda c: c.get("/limits", org=org_ref, key=key_id)), LIMIT_COLUMNS)


@limits.command("remove")
@with_subject
@pass_context
def limits_remove(ctx: Context, org_ref: str | None, key_id: str | None) -> None:
    """Lift every limit of an org or a key."""
    ctx.show(ctx.call(lambda c: c.delete("/limits", **_subject(org_ref, key_id))), LIMIT_COLUMNS)


CACHE_COLUMNS = ("org", "mode", "ttl_s", "entries", "bytes")


@admin.group()
def cache() -> None:
    """The response cache: per-org policy, and clearing it."""


@cache.command("set")
@click.option("--org", "org_ref", required=True, help="Org name or id.")
@click.option(
    "--mode",
    type=click.Choice(CACHE_MODES),
    default=None,
    help="off, deterministic (temperature 0 or a seed; the default) or all.",
)
@click.option("--ttl", "ttl_s", type=click.IntRange(min=0), default=None, help="Seconds an answer stays cached.")
@pass_context
def cache_set(ctx: Context, org_ref: str, mode: str | None, ttl_s: int | None) -> None:
    if mode is None and ttl_s is None:
        raise click.UsageError("give --mode and/or --ttl")
    ctx.show(ctx.call(lambda c: c.put("/cache", {"org": org_ref, "mode": mode, "ttl_s": ttl_s})), CACHE_COLUMNS)


@cache.command("show")
@click.option("--org", "org_ref", default=None, help="Only this org.")
@pass_context
def cache_show(ctx: Context, org_ref: str | None) -> None:
    ctx.show(ctx.call(lambda c: c.get("/cache", org=org_ref)), CACHE_COLUMNS)


@cache.command("clear")
@click.option("--org", "org_ref", default=None, help="Only this org's answers (default: all).")
@pass_context
def cache_clear(ctx: Context, org_ref: str | None) -> None:
    ctx.show(ctx.call(lambda c: c.delete("/cache", org=org_ref)), ("id", "removed"))


PRICE_COLUMNS = ("org", "provider", "model", "price_in", "price_out", "effective_from")


@admin.group()
def prices() -> None:
    """Model prices (USD per 1M tokens), versioned: a change applies from now on, never to past usage."""


@prices.command("set")
@click.argument("provider")
@click.option("--model", required=True, help="The model alias.")
@click.option("--in", "price_in", type=click.FloatRange(min=0), default=None, help="USD per 1M prompt tokens.")
@click.option("--out", "price_out", type=click.FloatRange(min=0), default=None, help="USD per 1M completion tokens.")
@click.option("--org", "org_ref", default=None, help="Org, when the provider name exists in several.")
@pass_context
def prices_set(
    ctx: Context, provider: str, model: str, price_in: float | None, price_out: float | None, org_ref: str | None
) -> None:
    """Set a model's price from now on (leaving both out makes it unpriced)."""
    body = {"provider": provider, "org": org_ref, "model": model, "price_in": price_in, "price_out": price_out}
    ctx.show(ctx.call(lambda c: c.put("/prices", body)), PRICE_COLUMNS)


@prices.command("list")
@click.option("--org", "org_ref", default=None, help="Only this org's prices.")
@click.option("--provider", default=None, help="Only this provider's.")
@pass_context
def prices_list(ctx: Context, org_ref: str | None, provider: str | None) -> None:
    """Every price each model has had, and since when."""
    ctx.show(ctx.call(lambda c: c.get("/prices", org=org_ref, provider=provider)), PRICE_COLUMNS)


# -- audit -----------------------------------------------------------------------------------------

AUDIT_COLUMNS = ("id", "created_at", "actor", "action", "target", "request_id")


@admin.group(invoke_without_command=True)
@click.option("--since", default=None, help="Only entries since: 24h, 7d, or an ISO date.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def audit(ctx: click.Context, since: str | None, as_json: bool) -> None:
    """Every admin change (who, what, before/after, when), hash-chained; `audit verify` checks the chain."""
    if ctx.invoked_subcommand is not None:
        return
    state: Context = ctx.obj
    state.as_json = state.as_json or as_json
    after = parse_since(since)
    state.show(state.call(lambda c: c.get("/audit", since=after)), AUDIT_COLUMNS)


@audit.command("verify")
@pass_context
def audit_verify(ctx: Context) -> None:
    """Recompute the chain; exit 1 naming the first entry that was edited, deleted or reordered."""
    verdict = ctx.call(lambda c: c.get("/audit/verify"))
    if ctx.as_json:
        click.echo(json.dumps(verdict, indent=2))
    elif verdict["ok"]:
        click.echo(f"audit log intact: {verdict['entries']} entries")
    if not verdict["ok"]:
        raise click.ClickException(f"audit log broken at entry {verdict['first_broken']}: {verdict['reason']}")


# -- models ----------------------------------------------------------------------------------------


@admin.command("models")
@click.option("--org", "org_ref", default=None, help="Only what keys of this org can call.")
@pass_context
def models(ctx: Context, org_ref: str | None) -> None:
    """Models each org's keys can call, and the targets that serve them in routing order."""
    doc = ctx.call(lambda c: c.get("/models", org=org_ref))
    if not ctx.as_json:
        doc = {
            "data": [
                {**m, "targets": [f"{t['kind']}:{t['id']}({t['upstream_model']})" for t in m["targets"]]}
                for m in doc["data"]
            ]
        }
    ctx.show(doc, ("org", "model", "targets"))


# -- accounts and scoped admin tokens (server.accounts) ---------------------------------------------

ACCOUNT_COLUMNS = ("id", "email", "name", "role", "org", "disabled", "created_at")
ROLE_CHOICE = click.Choice(["plane_admin", "org_admin", "developer", "provider"])


@admin.group()
def accounts() -> None:
    """People who sign in to the console: a role (plane_admin, org_admin, developer, provider) and an org."""


@accounts.command("create")
@click.argument("email")
@click.option("--role", type=ROLE_CHOICE, required=True)
@click.option("--org", "org_ref", default=None, help="Org name or id (every role but plane_admin has one).")
@click.option("--name", default="", help="The person's name.")
@click.option(
    "--password",
    prompt=True,
    hide_input=True,
    confirmation_prompt=True,
    envvar="HATCHWAY_ACCOUNT_PASSWORD",
    help="Asked for when not given (or HATCHWAY_ACCOUNT_PASSWORD); at least 10 characters.",
)
@pass_context
def accounts_create(ctx: Context, email: str, role: str, org_ref: str | None, name: str, password: str) -> None:
    body = {"email": email, "role": role, "org_id": org_ref, "name": name, "password": password}
    ctx.show(ctx.call(lambda c: c.post("/accounts", body)), ACCOUNT_COLUMNS)


@accounts.command("list")
@click.option("--org", "org_ref", default=None, help="Only this org's accounts.")
@pass_context
def accounts_list(ctx: Context, org_ref: str | None) -> None:
    ctx.show(ctx.call(lambda c: c.get("/accounts", org=org_ref)), ACCOUNT_COLUMNS)


@accounts.command("disable")
@click.argument("account_id")
@pass_context
def accounts_disable(ctx: Context, account_id: str) -> None:
    """Refuse the account's sign-ins and tokens from now on, and end its sessions."""
    ctx.show(ctx.call(lambda c: c.patch(f"/accounts/{account_id}", {"disabled": True})), ACCOUNT_COLUMNS)


@accounts.command("enable")
@click.argument("account_id")
@pass_context
def accounts_enable(ctx: Context, account_id: str) -> None:
    ctx.show(ctx.call(lambda c: c.patch(f"/accounts/{account_id}", {"disabled": False})), ACCOUNT_COLUMNS)


@accounts.command("remove")
@click.argument("account_id")
@pass_context
def accounts_remove(ctx: Context, account_id: str) -> None:
    """Delete the account: its sessions end, its admin tokens and console keys are revoked."""
    ctx.show(ctx.call(lambda c: c.delete(f"/accounts/{account_id}")), ACCOUNT_COLUMNS)


@accounts.command("invite")
@click.argument("email")
@click.option("--role", type=ROLE_CHOICE, required=True)
@click.option("--org", "org_ref", default=None, help="Org name or id (every role but plane_admin has one).")
@click.option("--ttl", default="7d", show_default=True, help="How long the link stays valid: 12h, 7d...")
@pass_context
def accounts_invite(ctx: Context, email: str, role: str, org_ref: str | None, ttl: str) -> None:
    """A link (single use, expiring) with which the person sets their name and password."""
    delta = parse_duration(ttl)
    if delta is None:
        raise click.BadParameter("use a duration like 12h or 7d", param_hint="--ttl")
    body = {"email": email, "role": role, "org_id": org_ref, "ttl_s": delta.total_seconds()}
    ctx.show(ctx.call(lambda c: c.post("/invitations", body)), ("id", "email", "role", "expires_at"), secret="url")


TOKEN_ADMIN_COLUMNS = ("id", "name", "role", "org_id", "account_id", "expires_at", "revoked_at")


@admin.group()
def tokens() -> None:
    """Scoped admin tokens (hwt_...): the admin API with a role and an org, for scripts and CI."""


@tokens.command("create")
@click.option("--role", type=ROLE_CHOICE, required=True)
@click.option("--org", "org_ref", default=None, help="Org name or id (every role but plane_admin has one).")
@click.option("--account", "account_id", default=None, help="The account it acts for (developer, provider).")
@click.option("--name", default="", help="A label for people.")
@click.option("--expires", default=None, help="30d, 12h, 90m, or an ISO date (default: never).")
@pass_context
def tokens_create(
    ctx: Context, role: str, org_ref: str | None, account_id: str | None, name: str, expires: str | None
) -> None:
    body: dict[str, Any] = {"role": role, "org_id": org_ref, "account_id": account_id, "name": name}
    if expires:
        body["expires_at"] = parse_expiry(expires)
    ctx.show(ctx.call(lambda c: c.post("/admin-tokens", body)), TOKEN_ADMIN_COLUMNS, secret="token")


@tokens.command("list")
@pass_context
def tokens_list(ctx: Context) -> None:
    ctx.show(ctx.call(lambda c: c.get("/admin-tokens")), TOKEN_ADMIN_COLUMNS)


@tokens.command("revoke")
@click.argument("token_id")
@pass_context
def tokens_revoke(ctx: Context, token_id: str) -> None:
    ctx.show(ctx.call(lambda c: c.post(f"/admin-tokens/{token_id}/revoke", {})), TOKEN_ADMIN_COLUMNS)
