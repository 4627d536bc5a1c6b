"""`hatchway admin ...` against a live plane, through click's CliRunner."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from server.cli import cli
from tests.conftest import ADMIN_KEY, MODEL, RunningPlane, usage_report
from tests.support.mock_upstream import MockUpstream


@pytest.fixture
def run(plane: RunningPlane):
    runner = CliRunner()

    def invoke(*args: str, as_json: bool = False) -> Result:
        flags = ["admin", "--url", plane.url, "--admin-key", ADMIN_KEY, *(["--json"] if as_json else [])]
        return runner.invoke(cli, [*flags, *args], catch_exceptions=False)

    return invoke


def json_of(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_org_create_and_list(run) -> None:
    created = json_of(run("org", "create", "acme", as_json=True))
    assert created["name"] == "acme" and created["id"].startswith("org_")
    listing = run("org", "list")
    assert listing.exit_code == 0
    assert "acme" in listing.output and "NAME" in listing.output


def test_key_create_prints_the_key_once_and_list_never_does(run) -> None:
    run("org", "create", "acme")
    created = json_of(run("key", "create", "--org", "acme", "--name", "ci", "--models", "a,b", as_json=True))
    assert created["key"].startswith("hw-")
    assert created["models"] == ["a", "b"]
    listing = run("key", "list", "--org", "acme")
    assert created["id"] in listing.output
    assert created["key"] not in listing.output


def test_key_create_table_shows_the_secret_with_a_warning(run) -> None:
    run("org", "create", "acme")
    result = run("key", "create", "--org", "acme")
    assert "shown once" in result.output and "hw-" in result.output


def test_key_create_with_expiry(run) -> None:
    run("org", "create", "acme")
    created = json_of(run("key", "create", "--org", "acme", "--expires", "30d", as_json=True))
    assert created["expires_at"] is not None


def test_key_revoke(run) -> None:
    run("org", "create", "acme")
    created = json_of(run("key", "create", "--org", "acme", as_json=True))
    revoked = json_of(run("key", "revoke", created["id"], as_json=True))
    assert revoked["revoked_at"] is not None


def test_provider_add_list_remove(run, upstream: MockUpstream) -> None:
    run("org", "create", "acme")
    added = json_of(
        run(
            "provider",
            "add",
            "openai",
            "--org",
            "acme",
            "--base-url",
            upstream.url,
            "--api-key",
            "sk-first",
            "--api-key",
            "sk-second",
            "--model",
            "gpt-4o-mini",
            "--model",
            "fast=gpt-4o-mini",
            "--price-in",
            "0.15",
            "--price-out",
            "0.6",
            as_json=True,
        )
    )
    assert [m["alias"] for m in added["models"]] == ["gpt-4o-mini", "fast"]
    assert added["models"][1] == {"alias": "fast", "upstream": "gpt-4o-mini", "price_in": 0.15, "price_out": 0.6}
    assert len(added["api_keys"]) == 2
    listing = run("provider", "list")
    assert "openai" in listing.output and "fast=gpt-4o-mini" in listing.output
    assert "sk-first" not in listing.output
    models = run("models", "--org", "acme")
    assert "provider:openai(gpt-4o-mini)" in models.output
    assert json_of(run("provider", "remove", "openai", as_json=True))["name"] == "openai"
    assert "(none)" in run("provider", "list").output


def test_mistakes_exit_1_with_a_message_and_no_traceback(run) -> None:
    result = run("key", "create", "--org", "no-such-org")
    assert result.exit_code == 1
    assert "no org 'no-such-org'" in result.output and "Traceback" not in result.output


def test_wrong_admin_key_is_reported(plane: RunningPlane) -> None:
    result = CliRunner().invoke(cli, ["admin", "--url", plane.url, "--admin-key", "hwa-wrong", "org", "list"])
    assert result.exit_code == 1 and "401" in result.output


def test_json_flag_is_accepted_after_the_subcommand_too(run) -> None:
    assert json_of(run("org", "create", "acme", "--json"))["name"] == "acme"


def test_unreachable_plane_is_reported() -> None:
    result = CliRunner().invoke(cli, ["admin", "--url", "http://127.0.0.1:9", "--admin-key", "k", "org", "list"])
    assert result.exit_code == 1 and "cannot reach the plane" in result.output


def test_admin_reads_url_and_key_from_the_environment(plane: RunningPlane) -> None:
    result = CliRunner().invoke(
        cli, ["admin", "org", "list"], env={"HATCHWAY_URL": plane.url, "HATCHWAY_ADMIN_KEY": ADMIN_KEY}
    )
    assert result.exit_code == 0, result.output


def test_route_set_list_remove(run, upstream: MockUpstream) -> None:
    run("org", "create", "acme")
    run("provider", "add", "a", "--org", "acme", "--base-url", upstream.url, "--model", "gpt-4o-mini")
    run("provider", "add", "b", "--org", "acme", "--base-url", upstream.url, "--model", "gpt-4o-mini")
    rule = json_of(
        run(
            "route", "set", "gpt-4o-mini", "--org", "acme", "--strategy", "weighted",
            "--targets", "a=3,b=1", "--fallback", "bigger", "--json",
        )
    )  # fmt: skip
    assert rule["strategy"] == "weighted"
    assert rule["targets"] == ["a=3", "b=1"] and rule["fallbacks"] == ["bigger"]
    assert "weighted" in run("route", "list", "--org", "acme").output
    assert json_of(run("route", "remove", "gpt-4o-mini", "--org", "acme", "--json"))["model"] == "gpt-4o-mini"
    assert "(none)" in run("route", "list").output


def test_provider_set_changes_failover_limits_and_keeps_the_others(run, upstream: MockUpstream) -> None:
    run("org", "create", "acme")
    run(
        "provider", "add", "a", "--org", "acme", "--base-url", upstream.url, "--model", "m",
        "--ttft-timeout", "5", "--max-retries", "0",
    )  # fmt: skip
    updated = json_of(run("provider", "set", "a", "--breaker-failures", "2", "--continuation", "vllm", "--json"))
    assert updated["policy"] == {"ttft_timeout_s": 5.0, "max_retries": 0, "breaker_failures": 2}
    assert updated["continuation"] == "vllm"


def test_usage_by_org_shows_no_cost_for_unpriced_requests_even_beside_free_cache_hits(
    run, plane: RunningPlane, upstream: MockUpstream
) -> None:
    plane.create_org("acme")
    plane.add_provider("unpriced", upstream)
    key = plane.create_key("acme")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    for _ in range(2):  # a miss served by the unpriced provider, then a hit (free, but not a price)
        httpx.post(f"{plane.v1}/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    usage_report(plane, 2)
    header, row = run("usage", "--by", "org").output.splitlines()
    cells = dict(zip(header.lower().split(), row.split(), strict=True))
    assert (cells["org"], cells["requests"], cells["cache_hits"]) == ("acme", "2", "1")
    assert cells["cost_usd"] == "-" and cells["unpriced_requests"] == "1"
