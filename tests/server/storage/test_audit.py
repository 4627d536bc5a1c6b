"""The audit log: every admin change recorded with who, what, before/after; tampering is detected."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner, Result

from server.cli import cli
from tests.conftest import ADMIN_KEY, RunningPlane
from tests.support.mock_upstream import MockUpstream


def entries(plane: RunningPlane) -> list[dict[str, Any]]:
    return plane.admin.get("/audit")["data"]  # type: ignore[no-any-return]


def run(plane: RunningPlane, *args: str) -> Result:
    return CliRunner().invoke(cli, ["admin", "--url", plane.url, "--admin-key", ADMIN_KEY, *args])


@pytest.fixture
def changed(plane: RunningPlane, upstream: MockUpstream) -> RunningPlane:
    plane.create_org("acme")
    key = plane.admin.post("/keys", {"org": "acme", "name": "ci"})
    plane.add_provider("mock-a", upstream)
    plane.admin.put("/routes", {"org": "acme", "model": "gpt-4o-mini", "strategy": "cheapest"})
    plane.admin.post(f"/keys/{key['id']}/revoke", {})
    plane.admin.delete("/providers/mock-a")
    return plane


def test_every_admin_change_is_recorded_in_order(changed: RunningPlane) -> None:
    actions = [e["action"] for e in entries(changed)]
    assert actions == ["org.create", "key.create", "provider.add", "route.set", "key.revoke", "provider.remove"]


def test_entries_name_the_admin_key_and_the_request(changed: RunningPlane) -> None:
    admin_id = changed.server.plane.snapshots.current.admin_keys
    assert {e["actor"] for e in entries(changed)} == set(admin_id.values())
    assert all(e["request_id"] for e in entries(changed))


def test_before_and_after_are_kept_and_secrets_redacted(changed: RunningPlane) -> None:
    by_action = {e["action"]: e for e in entries(changed)}
    assert by_action["key.create"]["after"]["key"] == "[redacted]"
    revoke = by_action["key.revoke"]
    assert revoke["before"]["revoked_at"] is None and revoke["after"]["revoked_at"] is not None
    removed = by_action["provider.remove"]
    assert removed["before"]["name"] == "mock-a" and removed["after"] is None
    assert "sk-mock-a" not in str(entries(changed))


def test_verify_passes_on_an_untouched_log(changed: RunningPlane) -> None:
    assert changed.admin.get("/audit/verify") == {"ok": True, "entries": 6, "first_broken": None, "reason": ""}
    result = run(changed, "audit", "verify")
    assert result.exit_code == 0 and "intact: 6 entries" in result.output


def test_verify_names_the_first_edited_entry(changed: RunningPlane) -> None:
    changed.sql("UPDATE audit_entry SET target = 'someone-else' WHERE id = 3")
    verdict = changed.admin.get("/audit/verify")
    assert verdict["ok"] is False and verdict["first_broken"] == 3
    result = run(changed, "audit", "verify")
    assert result.exit_code == 1 and "broken at entry 3" in result.output


def test_verify_notices_a_deleted_entry(changed: RunningPlane) -> None:
    changed.sql("DELETE FROM audit_entry WHERE id = 2")
    assert changed.admin.get("/audit/verify")["first_broken"] == 3


def test_audit_cli_lists_entries(changed: RunningPlane) -> None:
    result = run(changed, "audit")
    assert result.exit_code == 0 and "provider.remove" in result.output
    assert "org.create" in run(changed, "audit", "--since", "1h", "--json").output


def test_a_refused_change_writes_no_entry(changed: RunningPlane) -> None:
    before = len(entries(changed))
    assert run(changed, "org", "create", "acme").exit_code == 1  # already exists
    assert len(entries(changed)) == before
