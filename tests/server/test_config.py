"""Configuration: flag > environment > file > default, clear errors, and the declarative part of the file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.config import Config, ConfigError
from server.serving.serve import prepare
from tests.conftest import ADMIN_KEY, MODEL, RunningPlane
from tests.support.mock_upstream import MockUpstream


def test_defaults() -> None:
    config = Config.load(environ={})
    assert (config.host, config.port) == ("127.0.0.1", 8080)
    assert config.sqlalchemy_url == "sqlite:///.hatchway/hatchway.db"


def test_environment_beats_file_and_flag_beats_environment(tmp_path: Path) -> None:
    file = tmp_path / "h.toml"
    file.write_text("[server]\nport = 9000\nhost = '0.0.0.0'\nshutdown_grace_s = 3\n")
    config = Config.load(config_file=file, environ={"HATCHWAY_PORT": "9100"}, overrides={"host": "127.0.0.2"})
    assert (config.host, config.port, config.shutdown_grace_s) == ("127.0.0.2", 9100, 3.0)


def test_a_bad_value_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="HATCHWAY_PORT: expected int"):
        Config.load(environ={"HATCHWAY_PORT": "eighty"})


def test_a_negative_value_is_refused() -> None:
    with pytest.raises(ConfigError, match="HATCHWAY_MAX_BODY_BYTES"):
        Config.load(environ={"HATCHWAY_MAX_BODY_BYTES": "-1"})


def test_an_unknown_server_setting_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "h.toml"
    file.write_text("[server]\nprot = 1\n")
    with pytest.raises(ConfigError, match="unknown \\[server\\] settings: prot"):
        Config.load(config_file=file, environ={})


@pytest.mark.parametrize(
    ("declared", "where"),
    [
        ('[[orgs]]\nname = "acme"\nlabel = "Acme"\n', "orgs[0]: unknown fields: label"),
        (
            '[[providers]]\norg = "acme"\nname = "p"\nbase_url = "http://127.0.0.1:9/v1"\nmodels = ["m"]\n'
            'continuaton = "prefill"\n',
            "providers[0]: unknown fields: continuaton",
        ),
    ],
    ids=["org", "provider"],
)
def test_a_misspelt_key_in_a_declared_table_stops_the_start(tmp_path: Path, declared: str, where: str) -> None:
    file = tmp_path / "h.toml"
    file.write_text(declared)
    config = Config.load(
        config_file=file, environ={}, overrides={"data_dir": tmp_path / "data", "admin_key": ADMIN_KEY}
    )
    with pytest.raises(ConfigError, match=re.escape(where)):
        prepare(config)


@pytest.fixture
def plane_config(
    plane_config: Config, tmp_path: Path, upstream: MockUpstream, monkeypatch: pytest.MonkeyPatch
) -> Config:
    monkeypatch.setenv("MOCK_PROVIDER_KEY", "sk-from-env")
    file = tmp_path / "hatchway.toml"
    file.write_text(
        f"""
[[orgs]]
name = "declared"

[[providers]]
org = "declared"
name = "mock"
base_url = "{upstream.url}"
api_key_env = ["MOCK_PROVIDER_KEY"]
price_in = 0.5
models = ["{MODEL}", {{ alias = "pricey", upstream = "{MODEL}", price_in = 9 }}]
"""
    )
    return Config.load(
        config_file=file,
        environ={},
        overrides={"port": 0, "grpc_port": 0, "data_dir": plane_config.data_dir, "admin_key": ADMIN_KEY},
    )


def test_declared_orgs_and_providers_exist_at_start(plane: RunningPlane, upstream: MockUpstream) -> None:
    providers = plane.admin.get("/providers", org="declared")["data"]
    assert [p["name"] for p in providers] == ["mock"]
    assert providers[0]["models"] == [
        {"alias": MODEL, "upstream": MODEL, "price_in": 0.5, "price_out": None},
        {"alias": "pricey", "upstream": MODEL, "price_in": 9.0, "price_out": None},
    ]
    key = plane.create_key("declared")
    response = httpx.post(
        f"{plane.v1}/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 200
    assert upstream.requests[-1].headers["Authorization"] == "Bearer sk-from-env"


def config_entries(plane: RunningPlane) -> list[dict[str, Any]]:
    return [e for e in plane.admin.get("/audit")["data"] if e["actor"] == "config-file"]


def test_what_the_config_file_creates_is_audited_as_config_file(plane: RunningPlane) -> None:
    entries = config_entries(plane)
    assert [e["action"] for e in entries] == ["org.create", "provider.add"]
    assert entries[1]["after"]["base_url"].startswith("http://127.0.0.1")


def test_restarting_with_an_unchanged_config_file_writes_no_audit_entry(plane: RunningPlane) -> None:
    plane.restart()
    assert len(config_entries(plane)) == 2


def test_a_provider_changed_in_the_config_file_is_audited_with_before_and_after(
    plane: RunningPlane, plane_config: Config
) -> None:
    assert plane_config.config_file is not None
    text = plane_config.config_file.read_text().replace("price_in = 0.5", "price_in = 0.7")
    plane_config.config_file.write_text(text)
    plane.restart(
        Config.load(
            config_file=plane_config.config_file,
            environ={},
            overrides={"admin_key": ADMIN_KEY, "data_dir": plane_config.data_dir},
        )
    )
    update = config_entries(plane)[-1]
    assert update["action"] == "provider.update"
    assert update["before"]["models"][0]["price_in"] == 0.5
    assert update["after"]["models"][0]["price_in"] == 0.7
    assert plane.admin.get("/audit/verify")["ok"]
