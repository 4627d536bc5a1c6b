"""Rotating the admin key: the new key works, the previous one is refused, through restarts."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from click.testing import CliRunner, Result

from server.cli import cli
from server.config import Config
from tests.conftest import ADMIN_KEY, RunningPlane

NEW_KEY = "hwa-the-next-admin-key"
SHOWN_ONCE = re.compile(r"Admin key \(shown once.*\): (hwa-\S+)")


def status_with(plane: RunningPlane, admin_key: str) -> int:
    response = httpx.get(f"{plane.url}/admin/v1/orgs", headers={"Authorization": f"Bearer {admin_key}"})
    return response.status_code


def rotate(plane: RunningPlane, admin_key: str, *flags: str) -> Result:
    args = ["admin", "--url", plane.url, "--admin-key", admin_key, "rotate-admin-key", *flags]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_a_new_configured_admin_key_revokes_the_previous_one(plane: RunningPlane) -> None:
    plane.restart(plane.server.config.replace(admin_key=NEW_KEY))
    assert status_with(plane, NEW_KEY) == 200
    assert status_with(plane, ADMIN_KEY) == 401


def test_a_configured_rotation_is_in_the_audit_log(plane: RunningPlane) -> None:
    plane.restart(plane.server.config.replace(admin_key=NEW_KEY))
    entries = httpx.get(f"{plane.url}/admin/v1/audit", headers={"Authorization": f"Bearer {NEW_KEY}"}).json()["data"]
    assert (entries[-1]["actor"], entries[-1]["action"]) == ("admin-key-setting", "admin_key.rotate")


def test_the_previous_key_stays_revoked_after_another_restart(plane: RunningPlane) -> None:
    config = plane.server.config.replace(admin_key=NEW_KEY)
    plane.restart(config)
    plane.restart(config)
    assert status_with(plane, ADMIN_KEY) == 401 and status_with(plane, NEW_KEY) == 200


class TestGeneratedKey:
    @pytest.fixture
    def plane_config(self, plane_config: Config) -> Config:
        return plane_config.replace(admin_key="")

    @pytest.fixture
    def generated(self, plane: RunningPlane) -> str:
        key = plane.server.plane.generated_admin_key
        assert key is not None
        return key

    def test_configuring_a_key_revokes_the_generated_one(self, plane: RunningPlane, generated: str) -> None:
        plane.restart(plane.server.config.replace(admin_key=NEW_KEY))
        assert status_with(plane, NEW_KEY) == 200
        assert status_with(plane, generated) == 401

    def test_rotate_prints_a_new_key_once_and_the_old_one_stops_working(
        self, plane: RunningPlane, generated: str
    ) -> None:
        result = rotate(plane, generated)
        assert result.exit_code == 0, result.output
        match = SHOWN_ONCE.search(result.output)
        assert match is not None, result.output
        new_key = match.group(1)
        assert new_key != generated
        assert status_with(plane, generated) == 401
        assert status_with(plane, new_key) == 200

    def test_a_rotated_key_survives_a_restart_and_no_other_is_generated(
        self, plane: RunningPlane, generated: str
    ) -> None:
        new_key = json.loads(rotate(plane, generated, "--json").output)["key"]
        plane.restart()
        assert plane.server.plane.generated_admin_key is None
        assert status_with(plane, new_key) == 200
        assert status_with(plane, generated) == 401

    def test_rotation_is_in_the_audit_log(self, plane: RunningPlane, generated: str) -> None:
        rotated = json.loads(rotate(plane, generated, "--json").output)
        entries = httpx.get(
            f"{plane.url}/admin/v1/audit", headers={"Authorization": f"Bearer {rotated['key']}"}
        ).json()["data"]
        assert entries[-1]["action"] == "admin_key.rotate"
        assert rotated["key"] not in json.dumps(entries)


def test_rotate_is_refused_while_the_key_comes_from_the_configuration(plane: RunningPlane) -> None:
    result = rotate(plane, ADMIN_KEY)
    assert result.exit_code == 1
    assert "HATCHWAY_ADMIN_KEY" in result.output and "Traceback" not in result.output
    assert status_with(plane, ADMIN_KEY) == 200


def test_setting_an_earlier_key_again_makes_it_the_admin_key_again(plane: RunningPlane) -> None:
    plane.restart(plane.server.config.replace(admin_key=NEW_KEY))
    plane.restart(plane.server.config.replace(admin_key=ADMIN_KEY))
    assert status_with(plane, ADMIN_KEY) == 200
    assert status_with(plane, NEW_KEY) == 401
