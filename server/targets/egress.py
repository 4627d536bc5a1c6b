"""Egress: how the plane reaches a provider (directly or through an HTTP proxy) and with which TLS settings.

Proxies come from the environment, as curl and Python's HTTP libraries read it: `HTTPS_PROXY` for https
upstreams, `HTTP_PROXY` for http ones, `ALL_PROXY` for either when the other is unset (a lower-case name wins
over its upper-case one), minus the hosts `NO_PROXY` lists. A provider may name its own proxy instead
(`--proxy URL`, which `NO_PROXY` does not affect) or none (`--proxy none`).

- An https upstream is reached through a CONNECT tunnel and TLS runs end to end inside it: the proxy learns the
  host and port, never the request, the key or the answer.
- An http upstream through an http proxy gets absolute-form requests (`POST http://host:port/path`), what curl and
  every HTTP library send: proxies commonly refuse CONNECT to any port but 443.
- Only `http://` proxies: the plane speaks no TLS to the proxy itself. Credentials in the proxy URL
  (`http://user:pass@host:3128`, percent-encoded) become `Proxy-Authorization: Basic`; messages name a proxy by
  host and port only.

A provider's `--ca-file` replaces the system's CAs for it (as curl's `--cacert`); `--client-cert` and
`--client-key` are presented when the upstream asks for a certificate (mutual TLS). The files are read when a
connection opens and read again once one of them changes, so a certificate renewed in place is used by the next
new connection.

All of it is decided once per pool, that is per (origin, egress settings), when the pool is made: a request pays
nothing for it, and connections made with different settings are never shared.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

# A CONNECT answer's status line and headers, at most.
MAX_TUNNEL_HEAD_BYTES = 16 * 1024
# What a provider's `--proxy` may say besides a URL: no proxy at all, or the environment's (the default).
DIRECT = "none"
FROM_ENVIRONMENT = "env"


@dataclass(frozen=True, slots=True)
class Proxy:
    """An http proxy: where it listens and the `Proxy-Authorization` its URL's credentials make, if any."""

    host: str
    port: int
    # Never shown: the repr, messages and logs name the proxy by `address`.
    authorization: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> Proxy:
        """Raises ValueError with a message that quotes nothing of the URL (it may hold a password)."""
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError:
            raise ValueError("the proxy is not a valid URL") from None
        if parts.scheme != "http":
            # Most likely `https://` (TLS to the proxy itself) or `socks5://`.
            raise ValueError(f"only http:// proxies are supported, not {parts.scheme or 'a URL without'}://")
        if not parts.hostname:
            raise ValueError("the proxy URL names no host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("the proxy URL must be http://[user:password@]host[:port], without a path")
        authorization = None
        if parts.username is not None or parts.password is not None:
            credentials = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
            authorization = "Basic " + base64.b64encode(credentials.encode()).decode("ascii")
        return cls(parts.hostname, port or 80, authorization)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def redact(url: str) -> str:
    """A proxy URL as listings and the audit log show it: its credentials replaced by `***`."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()


@dataclass(frozen=True, slots=True)
class Egress:
    """A provider's own egress settings; what it leaves unset is the plane's (the environment's proxies, the
    system's CAs). Equal settings share connection pools, different ones never do."""

    # The provider's proxy; None uses the environment's, unless `direct`.
    proxy: Proxy | None = None
    direct: bool = False
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(path for path in (self.ca_file, self.client_cert, self.client_key) if path)


class NoProxy:
    """`NO_PROXY`: comma-separated entries, each a host name (`example.com` also matches its subdomains; a leading
    `.` or `*.` is allowed), an IP address or a CIDR network (matched against IP-literal upstreams only: names are
    not resolved), optionally with `:port`; `*` alone matches everything."""

    def __init__(self, value: str) -> None:
        self.everything = False
        self.names: list[tuple[str, int | None]] = []
        self.networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]] = []
        for raw in value.replace(" ", ",").split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            if entry == "*":
                self.everything = True
                continue
            host, port = _split_port(entry)
            try:
                self.networks.append((ipaddress.ip_network(host, strict=False), port))
            except ValueError:
                self.names.append((host.removeprefix("*").lstrip(".").rstrip("."), port))

    def __bool__(self) -> bool:
        return self.everything or bool(self.names or self.networks)

    def matches(self, host: str, port: int) -> bool:
        if self.everything:
            return True
        host = host.lower().rstrip(".")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if address is not None:
            for network, only in self.networks:
                if address in network and only in (None, port):
                    return True
        return any(
            (host == name or host.endswith("." + name)) and only in (None, port) for name, only in self.names if name
        )


def _split_port(entry: str) -> tuple[str, int | None]:
    """`host:port`, `[v6]:port`, `[v6]`, a bare IPv6 address or network (several colons: no port), or a host."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest.removeprefix(":")
        return host, int(port) if port.isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        if port.isdigit():
            return host, int(port)
    return entry, None


@dataclass(frozen=True)
class EnvironmentProxies:
    """The proxies the environment names, read once when the plane starts."""

    http: Proxy | None = None
    https: Proxy | None = None
    no_proxy: NoProxy = field(default_factory=lambda: NoProxy(""))

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> EnvironmentProxies:
        """Raises ValueError naming the variable (never quoting its value) when a proxy URL is unusable."""
        env = os.environ if environ is None else environ

        def read(name: str) -> tuple[str, str] | None:
            for variable in (name, name.upper()):
                value = env.get(variable, "").strip()
                if value:
                    return variable, value
            return None

        def proxy(name: str) -> Proxy | None:
            found = read(name) or read("all_proxy")
            if found is None:
                return None
            try:
                return Proxy.parse(found[1])
            except ValueError as exc:
                raise ValueError(f"{found[0]}: {exc}") from None

        no_proxy = read("no_proxy")
        return cls(proxy("http_proxy"), proxy("https_proxy"), NoProxy(no_proxy[1] if no_proxy else ""))

    def for_origin(self, scheme: str, host: str, port: int) -> Proxy | None:
        proxy = self.https if scheme == "https" else self.http
        if proxy is None or self.no_proxy.matches(host, port):
            return None
        return proxy


def choose_proxy(
    environment: EnvironmentProxies, egress: Egress | None, scheme: str, host: str, port: int
) -> Proxy | None:
    """The proxy a pool's connections go through: the provider's own, none, or the environment's."""
    if egress is not None:
        if egress.direct:
            return None
        if egress.proxy is not None:
            return egress.proxy
    return environment.for_origin(scheme, host, port)


# -- TLS -------------------------------------------------------------------------------------------


class TLSSettingsError(ValueError):
    """A CA file or client certificate that cannot be used; `param` names the setting (`ca_file`, ...)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def tls_context(egress: Egress) -> ssl.SSLContext:
    """A client context for a provider's own CA file and client certificate; raises TLSSettingsError."""
    if egress.client_key and not egress.client_cert:
        raise TLSSettingsError("a client key needs its client certificate (--client-cert)", "client_cert")
    try:
        context = ssl.create_default_context(cafile=egress.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise TLSSettingsError(f"cannot use the CA file {egress.ca_file}: {_why(exc)}", "ca_file") from None
    if egress.client_cert:
        try:
            # A key that is encrypted would make OpenSSL prompt for its password: refuse it instead.
            context.load_cert_chain(egress.client_cert, egress.client_key or None, password=_no_password)
        except (OSError, ssl.SSLError, ValueError, TypeError) as exc:
            files = egress.client_cert + (f" / key {egress.client_key}" if egress.client_key else "")
            raise TLSSettingsError(f"cannot use the client certificate {files}: {_why(exc)}", "client_cert") from None
    return context


def _no_password() -> str:
    raise ValueError("the key is encrypted; give an unencrypted PEM key (readable by the plane only)")


def _why(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ssl.SSLError) else str(exc)


class TLSContexts:
    """Client contexts by egress settings, built on first use: the system's CAs (SSL_CERT_FILE / SSL_CERT_DIR
    apply) where a provider sets no file of its own, else its own, rebuilt once one of its files changes."""

    def __init__(self, default: ssl.SSLContext | None = None) -> None:
        self._default = default
        self._own: dict[Egress, tuple[tuple[int, ...], ssl.SSLContext]] = {}

    def default(self) -> ssl.SSLContext:
        if self._default is None:
            self._default = ssl.create_default_context()
        return self._default

    def get(self, egress: Egress | None) -> ssl.SSLContext:
        """Raises TLSSettingsError when the provider's files cannot be used (any more)."""
        if egress is None or not egress.files:
            return self.default()
        # When a connection opens, not per request: three stats beside a handshake are nothing.
        try:
            stamp = tuple(os.stat(path).st_mtime_ns for path in egress.files)
        except OSError as exc:
            raise TLSSettingsError(f"cannot read {exc.filename}: {exc.strerror}", "ca_file") from None
        cached = self._own.get(egress)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        context = tls_context(egress)
        self._own[egress] = (stamp, context)
        return context


# -- CONNECT ---------------------------------------------------------------------------------------


class TunnelRefusedError(OSError):
    """The proxy answered the CONNECT with something other than 2xx."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the proxy answered the CONNECT with {status}")
        self.status = status


class _TunnelHandshake(asyncio.Protocol):
    """Reads the proxy's answer to a CONNECT; the connection is handed over to TLS once it is 2xx."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.answer: asyncio.Future[bytes] = loop.create_future()
        self.head = bytearray()

    def data_received(self, data: bytes) -> None:
        if self.answer.done():
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end >= 0:
            if len(self.head) > end + 4:
                # The upstream speaks only after our TLS hello: anything more is the proxy's, and not HTTP.
                self.answer.set_exception(OSError("the proxy sent data after its CONNECT answer"))
            else:
                self.answer.set_result(bytes(self.head[:end]))
        elif len(self.head) > MAX_TUNNEL_HEAD_BYTES:
            self.answer.set_exception(OSError("the proxy's CONNECT answer is too large"))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(ConnectionResetError("the proxy closed the connection during the CONNECT"))


def authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def open_tunnel(loop: asyncio.AbstractEventLoop, proxy: Proxy, host: str, port: int) -> asyncio.Transport:
    """A connection to the proxy, tunnelled to host:port (raises OSError, TunnelRefusedError among them)."""
    transport, handshake = await loop.create_connection(lambda: _TunnelHandshake(loop), proxy.host, proxy.port)
    target = authority(host, port)
    request = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
    if proxy.authorization:
        request += f"Proxy-Authorization: {proxy.authorization}\r\n"
    try:
        transport.write(request.encode("latin-1") + b"\r\n")
        head = await handshake.answer
        status_line = head.split(b"\r\n", 1)[0].split(b" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1.") or not status_line[1].isdigit():
            raise OSError("the proxy's answer to the CONNECT is not HTTP")
        status = int(status_line[1])
        if not 200 <= status < 300:
            raise TunnelRefusedError(status)
    except BaseException:
        transport.close()
        raise
    return transport
