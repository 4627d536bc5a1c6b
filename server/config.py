"""The plane's one typed configuration.

Each setting is looked up in this order: a CLI flag, the environment (`HATCHWAY_<NAME>`), the `[server]` table
of the TOML file given with `--config`, then the default below. docs/configuration.md documents every field
(tests/project/test_docs_configuration.py keeps the two in step).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.credentials import hash_key
from server.routing.failover import FailoverPolicy
from server.routing.hedge import parse_hedge

# How a setting holding a token's hash rather than the token says so (metrics_token).
TOKEN_HASH_PREFIX = "sha256:"


# What shared limits do while Redis is unreachable (server.shared.redis_limits); checked once, here.
REDIS_FAILURE_MODES = ("open", "closed")


@dataclass(frozen=True)
class Setting:
    name: str
    type: type
    default: Any
    help: str

    @property
    def env(self) -> str:
        return f"HATCHWAY_{self.name.upper()}"


SETTINGS: tuple[Setting, ...] = (
    Setting("host", str, "127.0.0.1", "Address the HTTP API binds to."),
    Setting("port", int, 8080, "Port of the HTTP API (0 picks a free one and logs it)."),
    Setting("data_dir", Path, Path(".hatchway"), "Where the SQLite database and the generated secret live."),
    Setting("database_url", str, "", "SQLAlchemy URL of the database; empty means SQLite in the data dir."),
    Setting(
        "redis_url",
        str,
        "",
        "Redis holding rate limits and quotas shared by several planes (redis://HOST:6379/0); empty: each plane "
        "its own.",
    ),
    Setting("redis_prefix", str, "hatchway:", "Prefix of every Redis key the plane writes (one per gateway)."),
    Setting(
        "redis_failure",
        str,
        "open",
        "With Redis unreachable: open (each plane holds the limits alone) or closed (requests with limits get 503).",
    ),
    Setting(
        "nats_url",
        str,
        "",
        "NATS carrying node jobs between planes and workers (nats://HOST:4222); empty: each plane "
        "serves only the nodes connected to it.",
    ),
    Setting("nats_prefix", str, "hatchway", "Prefix of every NATS subject the plane uses (one per gateway)."),
    Setting(
        "plane_name",
        str,
        "",
        "This plane's name in `admin nodes list` and /metrics; empty: HOST:PID.",
    ),
    Setting(
        "workers",
        str,
        "1",
        "Plane processes serving the same ports on this machine (a number, or auto: one per core).",
    ),
    Setting("admin_key", str, "", "Admin key to accept; empty means one is generated on first start."),
    Setting("secret_key", str, "", "Secret that encrypts provider keys at rest; empty: data_dir/secret.key."),
    Setting("max_body_bytes", int, 8 * 1024 * 1024, "Largest request body accepted (413 above)."),
    Setting(
        "header_read_timeout_s",
        float,
        10.0,
        "Time a client has to send a request's headers, from connecting or the request's first byte (0: none).",
    ),
    Setting("body_read_timeout_s", float, 30.0, "Longest silence while a client sends a request body (0: none)."),
    Setting("body_read_deadline_s", float, 300.0, "Longest time a client may take to send one body (0: none)."),
    Setting("keepalive_timeout_s", float, 75.0, "How long an idle keep-alive client connection stays open."),
    Setting(
        "max_connections_per_ip",
        int,
        256,
        "Connections one client address may hold open; more are closed at once (0: no cap).",
    ),
    Setting(
        "max_upstream_body_bytes",
        int,
        64 * 1024 * 1024,
        "Largest whole (non-stream) answer read from a provider; a larger one fails over.",
    ),
    Setting("metrics_public", bool, False, "Serve /metrics without authentication."),
    Setting(
        "metrics_token",
        str,
        "",
        "A bearer token that may read /metrics, besides the admin key; or its hash, as sha256:HEX.",
    ),
    Setting("shutdown_grace_s", float, 30.0, "How long in-flight requests may finish after SIGTERM."),
    Setting("upstream_connect_timeout_s", float, 10.0, "Connect timeout towards a provider."),
    Setting("upstream_header_timeout_s", float, 120.0, "Time a provider has to send response headers."),
    Setting("stream_idle_timeout_s", float, 60.0, "Longest silence between two stream chunks (a stall)."),
    Setting("ttft_timeout_s", float, 60.0, "Time to the first content token before a stream fails over."),
    Setting("stream_stall_floor_s", float, 5.0, "Silence a committed stream may always keep before it is a stall."),
    Setting("stream_stall_factor", float, 4.0, "A stall is a silence this many times the stream's longest gap so far."),
    Setting("stream_stall_ceiling_s", float, 10.0, "Longest silence of a committed stream, whatever its pace."),
    Setting("hedge", str, "auto", "Hedging of a slow first token where a route does not say: off, auto or seconds."),
    Setting("hedge_floor_s", float, 1.0, "Least hedge delay under auto (the target's TTFT p95 otherwise)."),
    Setting("hedge_unmeasured_s", float, 2.0, "Hedge delay under auto until the target's TTFT p95 is known."),
    Setting("max_retries", int, 1, "Extra tries of the same target after a 5xx or a reset connection."),
    Setting("max_rate_limit_retries", int, 2, "Extra tries of the same target after a 429."),
    Setting("retry_after_cap_s", float, 10.0, "Longest upstream Retry-After the plane waits for."),
    Setting("breaker_failures", int, 5, "Consecutive failures that open a target's circuit breaker."),
    Setting("breaker_cooldown_s", float, 15.0, "How long an open breaker waits before one probe request."),
    Setting("max_attempts", int, 6, "Most attempts (all targets together) for one request."),
    Setting("request_deadline_s", float, 300.0, "Time budget for one request's attempts, rescues included."),
    Setting("usage_flush_interval_s", float, 0.2, "How often the usage writer flushes rows to the database."),
    Setting("usage_queue_size", int, 10_000, "Bound of the usage queue; rows beyond it are counted and dropped."),
    Setting("usage_spool", bool, True, "Write each usage row to DATA_DIR/usage-spool before its request completes."),
    Setting("max_in_flight", int, 4096, "API requests served at once; beyond it new ones get 503 at once."),
    Setting(
        "overload_lag_ms",
        float,
        10.0,
        "Event-loop lag (smoothed) past which new API requests get 503 at once; 0 turns it off.",
    ),
    Setting(
        "overload_lag_floor",
        int,
        160,
        "Requests in flight below which a late event loop sheds nothing (a fixed pool of clients is served).",
    ),
    Setting("cache_max_bytes", int, 64 * 1024 * 1024, "Memory bound of the response cache (0 turns it off)."),
    Setting(
        "completion_estimate_tokens",
        int,
        1024,
        "Completion tokens reserved against token limits when a request sets no max_tokens.",
    ),
    Setting("grpc_port", int, 8443, "Port of the node service agents dial (gRPC over TLS; 0 picks a free one)."),
    Setting("grpc_insecure", bool, False, "Serve the node service without TLS: loopback development only."),
    Setting("grpc_tls_cert", str, "", "PEM certificate (chain) for the node service; empty: the plane's own CA."),
    Setting("grpc_tls_key", str, "", "PEM private key of grpc_tls_cert."),
    Setting("node_heartbeat_s", float, 5.0, "Heartbeat interval asked of agents; 3 missed stop dispatching."),
    Setting("node_queue_size", int, 64, "Requests that may wait for a busy model's node slot (then 503)."),
    Setting(
        "node_queue_timeout_s", float, 1.0, "Longest wait for a busy node pool's slot when no other target can serve."
    ),
    Setting("node_cancel_timeout_s", float, 10.0, "Time a node has to confirm a cancel before its slot is freed."),
    Setting("node_keepalive_s", float, 5.0, "Ping each node's link this often; unanswered as long, it is dropped."),
    Setting(
        "config_reload_s",
        float,
        30.0,
        "Full reload of orgs, keys, providers and routes from the database this often, besides the changes "
        "other planes announce (PostgreSQL); 0: never.",
    ),
    Setting("log_level", str, "info", "Logging level: debug, info, warning, error."),
    Setting("session_lifetime_s", float, 43200.0, "How long a console sign-in lasts (fixed, not extended by use)."),
    Setting("login_failures_per_email", int, 5, "Failed sign-ins for one email within the window before 429."),
    Setting("login_failures_per_address", int, 20, "Failed sign-ins from one client address within the window."),
    Setting("login_throttle_window_s", float, 300.0, "The sliding window failed sign-ins are counted over."),
)


class ConfigError(ValueError):
    """A setting has a value of the wrong shape; the message names the setting."""


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path(".hatchway")
    database_url: str = ""
    redis_url: str = ""
    redis_prefix: str = "hatchway:"
    redis_failure: str = "open"
    nats_url: str = ""
    nats_prefix: str = "hatchway"
    plane_name: str = ""
    workers: str = "1"
    admin_key: str = ""
    secret_key: str = ""
    max_body_bytes: int = 8 * 1024 * 1024
    header_read_timeout_s: float = 10.0
    body_read_timeout_s: float = 30.0
    body_read_deadline_s: float = 300.0
    # Longer than the keep-alive of the reverse proxies that may sit in front (nginx: 60 s), so that the plane
    # never closes a connection a proxy is about to reuse.
    keepalive_timeout_s: float = 75.0
    max_connections_per_ip: int = 256
    max_upstream_body_bytes: int = 64 * 1024 * 1024
    metrics_public: bool = False
    metrics_token: str = ""
    shutdown_grace_s: float = 30.0
    upstream_connect_timeout_s: float = 10.0
    upstream_header_timeout_s: float = 120.0
    stream_idle_timeout_s: float = 60.0
    ttft_timeout_s: float = 60.0
    stream_stall_floor_s: float = 5.0
    stream_stall_factor: float = 4.0
    # Well under the 30 s a client typically waits for a silent stream: the rescue must come before it gives up.
    stream_stall_ceiling_s: float = 10.0
    hedge: str = "auto"
    hedge_floor_s: float = 1.0
    hedge_unmeasured_s: float = 2.0
    max_retries: int = 1
    max_rate_limit_retries: int = 2
    retry_after_cap_s: float = 10.0
    breaker_failures: int = 5
    breaker_cooldown_s: float = 15.0
    max_attempts: int = 6
    request_deadline_s: float = 300.0
    usage_flush_interval_s: float = 0.2
    usage_queue_size: int = 10_000
    usage_spool: bool = True
    max_in_flight: int = 4096
    # 10 rather than 30: at twice the capacity refusals come sooner, more is served and its p99 is lower
    # (bench/README.md, load-shedding settings); the floor keeps a fixed pool of clients unshed.
    overload_lag_ms: float = 10.0
    overload_lag_floor: int = 160
    cache_max_bytes: int = 64 * 1024 * 1024
    completion_estimate_tokens: int = 1024
    grpc_port: int = 8443
    grpc_insecure: bool = False
    grpc_tls_cert: str = ""
    grpc_tls_key: str = ""
    node_heartbeat_s: float = 5.0
    node_queue_size: int = 64
    node_queue_timeout_s: float = 1.0
    node_cancel_timeout_s: float = 10.0
    node_keepalive_s: float = 5.0
    # A safety net only (PostgreSQL announces each change to every plane at once): SQLite planes sharing a file
    # see each other's changes this late.
    config_reload_s: float = 30.0
    log_level: str = "info"
    session_lifetime_s: float = 43200.0
    login_failures_per_email: int = 5
    login_failures_per_address: int = 20
    login_throttle_window_s: float = 300.0
    # The declarative part of the TOML file (orgs, providers, models), applied at start-up.
    declared: Mapping[str, Any] = field(default_factory=dict)
    config_file: Path | None = None

    def __post_init__(self) -> None:
        # Only the metrics token's hash is kept, which is all server.api.ops compares: the token itself is in no
        # dump of the config nor of the process. An operator may give the hash in the first place.
        if self.metrics_token and not self.metrics_token.startswith(TOKEN_HASH_PREFIX):
            object.__setattr__(self, "metrics_token", TOKEN_HASH_PREFIX + hash_key(self.metrics_token))
        try:
            object.__setattr__(self, "hedge", parse_hedge(self.hedge))
        except ValueError as exc:
            raise ConfigError(f"hedge: {exc}") from None
        if self.redis_failure not in REDIS_FAILURE_MODES:
            raise ConfigError(f"redis_failure: expected open or closed, got {self.redis_failure!r}")

    @classmethod
    def load(
        cls,
        *,
        overrides: Mapping[str, Any] | None = None,
        config_file: Path | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Config:
        environ = os.environ if environ is None else environ
        file_doc: dict[str, Any] = {}
        if config_file is not None:
            try:
                file_doc = tomllib.loads(config_file.read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
        file_settings = file_doc.get("server", {})
        if not isinstance(file_settings, dict):
            raise ConfigError(f"{config_file}: [server] must be a table")
        unknown = set(file_settings) - {s.name for s in SETTINGS}
        if unknown:
            raise ConfigError(f"{config_file}: unknown [server] settings: {', '.join(sorted(unknown))}")

        values: dict[str, Any] = {}
        for setting in SETTINGS:
            if overrides and overrides.get(setting.name) is not None:
                raw, origin = overrides[setting.name], f"--{setting.name.replace('_', '-')}"
            elif setting.env in environ:
                raw, origin = environ[setting.env], setting.env
            elif setting.name in file_settings:
                raw, origin = file_settings[setting.name], f"[server].{setting.name} in {config_file}"
            else:
                continue
            values[setting.name] = _cast(setting, raw, origin)
        declared = {k: v for k, v in file_doc.items() if k != "server"}
        return cls(**values, declared=declared, config_file=config_file)

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'hatchway.db'}"

    def failover_policy(self) -> FailoverPolicy:
        """The plane-wide defaults each provider's own overrides start from."""
        return FailoverPolicy(
            connect_timeout_s=self.upstream_connect_timeout_s,
            header_timeout_s=self.upstream_header_timeout_s,
            ttft_timeout_s=self.ttft_timeout_s,
            idle_timeout_s=self.stream_idle_timeout_s,
            stall_floor_s=self.stream_stall_floor_s,
            stall_factor=self.stream_stall_factor,
            stall_ceiling_s=self.stream_stall_ceiling_s,
            hedge_floor_s=self.hedge_floor_s,
            hedge_unmeasured_s=self.hedge_unmeasured_s,
            max_retries=self.max_retries,
            max_rate_limit_retries=self.max_rate_limit_retries,
            retry_after_cap_s=self.retry_after_cap_s,
            breaker_failures=self.breaker_failures,
            breaker_cooldown_s=self.breaker_cooldown_s,
        )

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def _cast(setting: Setting, raw: Any, origin: str) -> Any:
    try:
        if setting.type is Path:
            return Path(str(raw)).expanduser()
        if setting.type is bool and isinstance(raw, str):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        value = setting.type(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{origin}: expected {setting.type.__name__}, got {raw!r}") from exc
    if setting.type in (int, float) and value < 0:
        raise ConfigError(f"{origin}: must not be negative, got {raw!r}")
    return value
