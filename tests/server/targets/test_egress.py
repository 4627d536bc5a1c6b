"""Egress (server/targets/egress.py): proxies from the environment or per provider, a provider's own CA and client
certificate, against a real proxy on loopback (tests/support/connect_proxy.py) and TLS upstreams of a private CA
(tests/support/private_ca.py). The client-level tests drive server.targets.http directly; the last ones go through the
plane, its admin API and CLI."""

from __future__ import annotations

import contextlib
import json
import os
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
import uvloop
from click.testing import CliRunner

from server.cli import cli
from server.config import ConfigError
from server.targets.egress import Egress, EnvironmentProxies, NoProxy, Proxy
from server.targets.http import ConnectError, Endpoint, HTTPClient, HTTPClientError
from server.targets.provider import UpstreamPool
from tests.conftest import ADMIN_KEY, MODEL, RunningPlane
from tests.support.connect_proxy import ConnectProxy
from tests.support.mock_upstream import MockUpstream
from tests.support.private_ca import PrivateCA, make_private_ca

CHAT = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
USER, PASSWORD = "plane user", "p@ss:w/rd%secret"


@pytest.fixture
def ca(tmp_path: Path) -> PrivateCA:
    return make_private_ca(tmp_path / "ca")


@pytest.fixture
async def upstream() -> AsyncIterator[MockUpstream]:
    async with MockUpstream() as mock:
        yield mock


@pytest.fixture
async def tls_upstream(ca: PrivateCA) -> AsyncIterator[MockUpstream]:
    mock = MockUpstream()
    mock.tls = ca.server_context()
    async with mock:
        yield mock


@pytest.fixture
async def proxy() -> AsyncIterator[ConnectProxy]:
    async with ConnectProxy() as running:
        yield running


@pytest.fixture
async def guarded_proxy() -> AsyncIterator[ConnectProxy]:
    """A proxy that answers 407 unless the request carries USER and PASSWORD."""
    async with ConnectProxy(credentials=(USER, PASSWORD)) as running:
        yield running


async def chat(http: HTTPClient, base_url: str, egress: Egress | None = None) -> int:
    response = await http.post(
        Endpoint.parse(f"{base_url}/chat/completions", egress),
        [("Content-Type", "application/json"), ("Authorization", "Bearer sk-test")],
        CHAT,
        connect_timeout_s=5,
        header_timeout_s=5,
    )
    try:
        await response.read(5)
        return response.status
    finally:
        response.release()


def environment(**variables: str) -> EnvironmentProxies:
    return EnvironmentProxies.from_environ(variables)


@contextlib.asynccontextmanager
async def client(**variables: str) -> AsyncIterator[HTTPClient]:
    """The plane's upstream client, as if started with these environment variables."""
    http = HTTPClient(proxies=environment(**variables))
    try:
        yield http
    finally:
        await http.close()


# -- proxies ---------------------------------------------------------------------------------------


async def test_an_https_upstream_is_reached_through_one_connect_tunnel_from_https_proxy(
    ca: PrivateCA, tls_upstream: MockUpstream, proxy: ConnectProxy
) -> None:
    async with client(HTTPS_PROXY=proxy.url) as http:
        for _ in range(3):
            assert await chat(http, tls_upstream.url, Egress(ca_file=str(ca.ca_file))) == 200
    # Kept alive inside its tunnel: one CONNECT for every request.
    assert proxy.tunnels == [f"localhost:{tls_upstream.port}"]
    assert [r.path for r in tls_upstream.requests] == ["/v1/chat/completions"] * 3


async def test_an_http_upstream_through_http_proxy_gets_absolute_form_requests(
    upstream: MockUpstream, proxy: ConnectProxy
) -> None:
    async with client(HTTP_PROXY=proxy.url) as http:
        assert await chat(http, upstream.url) == 200
        assert await chat(http, upstream.url) == 200
    assert proxy.forwarded == [f"http://127.0.0.1:{upstream.port}/v1/chat/completions"] * 2
    assert proxy.tunnels == [] and proxy.connections == 1
    assert len(upstream.requests) == 2


def test_all_proxy_serves_either_scheme_when_the_specific_variable_is_unset() -> None:
    proxies = environment(ALL_PROXY="http://all:3128", HTTP_PROXY="http://plain:3128")
    assert proxies.https == Proxy("all", 3128) and proxies.http == Proxy("plain", 3128)


async def test_credentials_in_the_proxy_url_become_basic_proxy_authorization_on_tunnels_and_requests(
    ca: PrivateCA, tls_upstream: MockUpstream, upstream: MockUpstream, guarded_proxy: ConnectProxy
) -> None:
    proxy = guarded_proxy
    async with client(HTTPS_PROXY=proxy.url, HTTP_PROXY=proxy.url) as http:
        assert await chat(http, tls_upstream.url, Egress(ca_file=str(ca.ca_file))) == 200
        assert await chat(http, upstream.url) == 200
        assert await chat(http, upstream.url) == 200
    assert len(proxy.tunnels) == 1 and len(proxy.forwarded) == 2
    assert len(proxy.authorizations) == 3 and len(set(proxy.authorizations)) == 1
    assert proxy.authorizations[0] is not None
    # The upstream never sees the proxy's credentials.
    assert all("proxy-authorization" not in r.headers for r in upstream.requests + tls_upstream.requests)


async def test_a_proxy_refusing_the_credentials_is_a_connect_error_naming_neither_user_nor_password(
    ca: PrivateCA, tls_upstream: MockUpstream, guarded_proxy: ConnectProxy
) -> None:
    wrong = f"http://{quote(USER)}:wrong-password@127.0.0.1:{guarded_proxy.port}"
    async with client(HTTPS_PROXY=wrong) as http:
        with pytest.raises(ConnectError) as raised:
            await chat(http, tls_upstream.url, Egress(ca_file=str(ca.ca_file)))
    assert raised.value.reason == "the proxy refused the tunnel: 407"
    for secret in ("wrong-password", "plane", "user"):
        assert secret not in str(raised.value) and secret not in raised.value.reason
    assert f"127.0.0.1:{guarded_proxy.port}" in str(raised.value)


async def test_a_proxy_nobody_listens_on_is_a_connect_error_that_says_proxy(
    ca: PrivateCA, tls_upstream: MockUpstream
) -> None:
    async with ConnectProxy() as gone:
        url = gone.url
    async with client(HTTPS_PROXY=url) as http:
        with pytest.raises(ConnectError) as raised:
            await chat(http, tls_upstream.url, Egress(ca_file=str(ca.ca_file)))
    assert raised.value.reason == "proxy: connection refused"


async def test_no_proxy_sends_the_hosts_it_lists_directly(upstream: MockUpstream, proxy: ConnectProxy) -> None:
    async with client(HTTP_PROXY=proxy.url, NO_PROXY="example.com, 127.0.0.0/8") as http:
        assert await chat(http, upstream.url) == 200
    assert proxy.connections == 0 and len(upstream.requests) == 1


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "bypassed"),
    [
        ("*", "api.openai.com", 443, True),
        ("openai.com", "api.openai.com", 443, True),
        ("openai.com", "openai.com", 443, True),
        (".openai.com", "api.openai.com", 443, True),
        ("*.openai.com", "api.openai.com", 443, True),
        ("openai.com", "notopenai.com", 443, False),
        ("OpenAI.com.", "API.openai.COM", 443, True),
        ("api.openai.com:8443", "api.openai.com", 443, False),
        ("api.openai.com:8443", "api.openai.com", 8443, True),
        ("10.0.0.0/8", "10.1.2.3", 80, True),
        ("10.0.0.0/8", "11.1.2.3", 80, False),
        ("10.1.2.3", "10.1.2.3", 80, True),
        ("10.0.0.0/8", "internal.example", 80, False),  # names are not resolved
        ("fd00::/8", "fd12::1", 443, True),
        ("[::1]:8080", "::1", 8080, True),
        ("[::1]:8080", "::1", 8081, False),
        ("a.com,, b.com ,c.com", "x.b.com", 443, True),
        ("", "api.openai.com", 443, False),
    ],
)
def test_no_proxy_matches_hosts_domains_ports_addresses_and_networks(
    no_proxy: str, host: str, port: int, bypassed: bool
) -> None:
    assert NoProxy(no_proxy).matches(host, port) is bypassed


async def test_a_provider_with_proxy_none_connects_directly_whatever_the_environment_says(
    upstream: MockUpstream, proxy: ConnectProxy
) -> None:
    async with client(HTTP_PROXY=proxy.url) as http:
        assert await chat(http, upstream.url, Egress(direct=True)) == 200
    assert proxy.connections == 0 and len(upstream.requests) == 1


async def test_a_providers_own_proxy_replaces_the_environments_and_ignores_no_proxy(
    upstream: MockUpstream, proxy: ConnectProxy
) -> None:
    async with ConnectProxy() as environments, client(HTTP_PROXY=environments.url, NO_PROXY="*") as http:
        assert await chat(http, upstream.url, Egress(proxy=Proxy.parse(proxy.url))) == 200
    assert environments.connections == 0
    assert proxy.forwarded == [f"http://127.0.0.1:{upstream.port}/v1/chat/completions"]


async def test_connections_made_with_other_egress_settings_are_never_shared(
    upstream: MockUpstream, proxy: ConnectProxy
) -> None:
    async with client(HTTP_PROXY=proxy.url) as http:
        for egress in (None, Egress(direct=True), None, Egress(direct=True)):
            assert await chat(http, upstream.url, egress) == 200
    # Both proxied requests on the proxy's one connection; neither direct one went near it.
    assert proxy.connections == 1 and len(proxy.forwarded) == 2
    assert len(upstream.requests) == 4


def test_a_proxy_variable_the_plane_cannot_use_stops_its_start_naming_the_variable_not_its_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "socks5://someone:hunter2@proxy.internal:1080")
    with pytest.raises(ConfigError) as raised:
        UpstreamPool()
    assert "HTTPS_PROXY" in str(raised.value) and "http://" in str(raised.value)
    assert "hunter2" not in str(raised.value) and "someone" not in str(raised.value)


# -- TLS -------------------------------------------------------------------------------------------


async def test_a_private_ca_is_trusted_only_for_the_provider_that_names_it(
    ca: PrivateCA, tls_upstream: MockUpstream
) -> None:
    async with client() as http:
        with pytest.raises(ConnectError) as raised:
            await chat(http, tls_upstream.url)
        assert await chat(http, tls_upstream.url, Egress(ca_file=str(ca.ca_file))) == 200
    assert raised.value.reason == "TLS handshake failed"


async def test_a_client_certificate_is_presented_to_an_upstream_that_requires_one(ca: PrivateCA) -> None:
    mock = MockUpstream()
    mock.tls = ca.server_context(require_client_cert=True)
    with_certificate = Egress(ca_file=str(ca.ca_file), client_cert=str(ca.client_cert), client_key=str(ca.client_key))
    async with mock, client() as http:
        # Refused in the handshake (TLS 1.2) or right after it (TLS 1.3): either way no answer.
        with pytest.raises(HTTPClientError):
            await chat(http, mock.url, Egress(ca_file=str(ca.ca_file)))
        assert await chat(http, mock.url, with_certificate) == 200
    assert len(mock.requests) == 1


async def test_a_ca_file_replaced_in_place_is_read_again_by_the_next_connection(
    ca: PrivateCA, tls_upstream: MockUpstream, tmp_path: Path
) -> None:
    other = make_private_ca(tmp_path / "other")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(other.ca_file.read_bytes())
    egress = Egress(ca_file=str(bundle))
    async with client() as http:
        with pytest.raises(ConnectError):
            await chat(http, tls_upstream.url, egress)
        bundle.write_bytes(ca.ca_file.read_bytes())
        os.utime(bundle, ns=(0, bundle.stat().st_mtime_ns + 1_000_000))
        assert await chat(http, tls_upstream.url, egress) == 200


async def test_tls_files_that_cannot_be_read_fail_the_connection_as_unusable_settings(
    tls_upstream: MockUpstream, tmp_path: Path
) -> None:
    async with client() as http:
        with pytest.raises(ConnectError) as raised:
            await chat(http, tls_upstream.url, Egress(ca_file=str(tmp_path / "gone.pem")))
    assert raised.value.reason == "TLS settings unusable"


def test_under_uvloop_a_tunnel_carries_mutual_tls(ca: PrivateCA) -> None:
    async def scenario() -> None:
        mock = MockUpstream()
        mock.tls = ca.server_context(require_client_cert=True)
        egress = Egress(ca_file=str(ca.ca_file), client_cert=str(ca.client_cert), client_key=str(ca.client_key))
        async with mock, ConnectProxy(credentials=(USER, PASSWORD)) as proxy:
            async with client(HTTPS_PROXY=proxy.url) as http:
                assert await chat(http, mock.url, egress) == 200
                assert await chat(http, mock.url, egress) == 200
            assert proxy.tunnels == [f"localhost:{mock.port}"]

    uvloop.run(scenario())


# -- through the plane -----------------------------------------------------------------------------


@pytest.fixture
def plane_proxy(plane: RunningPlane) -> Any:
    proxy = ConnectProxy(credentials=(USER, PASSWORD))
    plane.loop_thread.run(proxy.start())
    yield proxy
    plane.loop_thread.run(proxy.stop())


def private_upstream(make_upstream: Callable[..., MockUpstream], ca: PrivateCA) -> MockUpstream:
    return make_upstream("private", tls=ca.server_context(require_client_cert=True))


def tls_settings(ca: PrivateCA) -> dict[str, str]:
    return {"ca_file": str(ca.ca_file), "client_cert": str(ca.client_cert), "client_key": str(ca.client_key)}


def test_a_provider_behind_a_proxy_with_its_own_ca_and_client_certificate_serves_through_the_plane(
    plane: RunningPlane, plane_proxy: ConnectProxy, make_upstream: Callable[..., MockUpstream], ca: PrivateCA
) -> None:
    upstream = private_upstream(make_upstream, ca)
    plane.create_org()
    added = plane.add_provider("private", upstream, proxy=plane_proxy.url, **tls_settings(ca))
    client = openai_client(plane)
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "Hello from mock"
    assert plane_proxy.tunnels == [f"localhost:{upstream.port}"]
    assert added["egress"] == {"proxy": f"http://***@127.0.0.1:{plane_proxy.port}", **tls_settings(ca)}


def test_a_proxy_password_is_stored_encrypted_and_shown_nowhere(
    plane: RunningPlane, plane_proxy: ConnectProxy, make_upstream: Callable[..., MockUpstream], ca: PrivateCA
) -> None:
    upstream = private_upstream(make_upstream, ca)
    plane.create_org()
    plane.add_provider("private", upstream, proxy=plane_proxy.url, **tls_settings(ca))
    plane.admin.patch("/providers/private", {"proxy": "none"})
    shown = json.dumps([plane.admin.get("/providers"), plane.admin.get("/audit")])
    stored = json.dumps(plane.sql("SELECT * FROM provider"))
    data_dir = plane.server.config.data_dir
    for secret in (PASSWORD, "p%40ss"):
        assert secret not in shown and secret not in stored
    assert b"p@ss:w/rd" not in b"".join(p.read_bytes() for p in data_dir.iterdir() if p.is_file())


def test_provider_set_changes_the_egress_for_the_next_request(
    plane: RunningPlane, make_upstream: Callable[..., MockUpstream]
) -> None:
    proxy = ConnectProxy()
    plane.loop_thread.run(proxy.start())
    try:
        upstream = make_upstream("plain")
        plane.create_org()
        plane.add_provider("plain", upstream, proxy=proxy.url)
        client = openai_client(plane)
        ask = lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])  # noqa: E731
        ask()
        assert len(proxy.forwarded) == 1
        assert plane.admin.patch("/providers/plain", {"proxy": "none"})["egress"] == {"proxy": "none"}
        ask()
        assert len(proxy.forwarded) == 1 and len(upstream.requests) == 2
        assert plane.admin.patch("/providers/plain", {"proxy": "env"})["egress"] == {}
        ask()
        assert len(proxy.forwarded) == 1 and len(upstream.requests) == 3
    finally:
        plane.loop_thread.run(proxy.stop())


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"proxy": "https://proxy.internal:3128"}, "proxy"),
        ({"proxy": "socks5://u:hunter2@proxy.internal:1080"}, "proxy"),
        ({"proxy": "http://proxy.internal:3128/some/path"}, "proxy"),
        ({"ca_file": "relative/ca.pem"}, "ca_file"),
        ({"ca_file": "/nonexistent/ca.pem"}, "ca_file"),
        ({"client_key": "CLIENT_KEY"}, "client_cert"),
        ({"client_cert": "CA_FILE"}, "client_cert"),  # a certificate without its key
        ({"ca_file": "CLIENT_KEY"}, "ca_file"),  # not a certificate
    ],
)
def test_egress_settings_the_plane_cannot_use_are_refused_naming_the_setting(
    plane: RunningPlane, upstream_for_plane: MockUpstream, ca: PrivateCA, fields: dict[str, str], param: str
) -> None:
    files = {"CA_FILE": str(ca.ca_file), "CLIENT_KEY": str(ca.client_key)}
    fields = {name: files.get(value, value) for name, value in fields.items()}
    plane.create_org()
    body = {"org": "acme", "name": "p", "base_url": upstream_for_plane.url, "models": [MODEL], **fields}
    answer = httpx.post(f"{plane.url}/admin/v1/providers", json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == param
    assert "hunter2" not in answer.text


@pytest.fixture
def upstream_for_plane(make_upstream: Callable[..., MockUpstream]) -> MockUpstream:
    return make_upstream("plain")


def test_the_cli_sets_and_clears_a_providers_egress(
    plane: RunningPlane, upstream_for_plane: MockUpstream, ca: PrivateCA
) -> None:
    def admin(*args: str) -> Any:
        flags = ["admin", "--url", plane.url, "--admin-key", ADMIN_KEY, "--json", "provider"]
        result = CliRunner().invoke(cli, [*flags, *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    plane.create_org()
    added = admin(
        "add", "p", "--org", "acme", "--base-url", upstream_for_plane.url, "--model", MODEL,
        "--proxy", "http://u:hunter2@proxy.internal:3128", "--ca-file", str(ca.ca_file),
    )  # fmt: skip
    assert added["egress"] == {"proxy": "http://***@proxy.internal:3128", "ca_file": str(ca.ca_file)}
    changed = admin(
        "set", "p", "--proxy", "none", "--ca-file", "",
        "--client-cert", str(ca.client_cert), "--client-key", str(ca.client_key),
    )  # fmt: skip
    assert changed["egress"] == {"proxy": "none", "client_cert": str(ca.client_cert), "client_key": str(ca.client_key)}


def openai_client(plane: RunningPlane) -> Any:
    import openai

    return openai.OpenAI(base_url=plane.v1, api_key=plane.create_key(), max_retries=0)


def test_an_ssl_context_is_not_built_per_request(ca: PrivateCA) -> None:
    """The hot path pays nothing for egress: with no provider setting, every pool shares one default context."""
    http = HTTPClient(proxies=EnvironmentProxies())
    assert http.tls.get(None) is http.tls.get(Egress(direct=True)) is http.tls.get(None)
    own = Egress(ca_file=str(ca.ca_file))
    assert http.tls.get(own) is http.tls.get(own) and isinstance(http.tls.get(own), ssl.SSLContext)
