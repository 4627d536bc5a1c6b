"""Nodes in the console: a real agent enrolled with the command the page shows turns ready on the page, then
answers in the playground, streamed; drained and resumed from the page."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import Console
from tests.conftest import eventually
from tests.support.agent_process import DEMO_MODEL, AgentProcess, describe


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop()


def enroll_from_page(page: Page, tmp_path: Path, agents: list[AgentProcess]) -> AgentProcess:
    """Make a token in the page and enroll a real agent with the command the page shows for an installed agent."""
    form = page.get_by_role("form", name="Enroll a machine")
    form.get_by_label("Served as").fill(DEMO_MODEL)
    form.get_by_role("button", name="Create token").click()
    token = page.get_by_test_id("enroll-token").inner_text()
    commands = {os: page.locator(f'pre[data-os="{os}"]').inner_text() for os in ("Linux (systemd)", "Docker")}
    assert f"--token {token}" in commands["Linux (systemd)"]
    assert f"HATCHWAY_ENROLL_TOKEN={token}" in commands["Docker"]
    shown = page.locator('pre[data-os^="An installed agent"]').inner_text()
    enroll = shlex.split(shown.split(" && ")[0])
    assert enroll[:2] == ["hatchway-agent", "enroll"]
    agent = AgentProcess(tmp_path, "lab-box")
    agents.append(agent)
    result = subprocess.run(
        [sys.executable, "-m", "agent", *enroll[1:], "--name", agent.name, "--config", str(agent.config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, describe(result)
    agent.start()
    return agent


def test_an_agent_enrolled_from_the_page_turns_ready_and_answers_in_the_playground(
    console: Console, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    page = console.sign_in("org_admin")
    console.open(page, "Nodes")
    expect(page.get_by_test_id("nodes")).to_contain_text("No nodes yet")
    agent = enroll_from_page(page, tmp_path, agents)
    row = page.get_by_test_id("nodes").get_by_role("row").filter(has_text="lab-box")
    # The page refreshes itself: no reload.
    expect(row.locator("[data-state]")).to_have_text("ready", timeout=60_000)
    expect(row).to_contain_text(DEMO_MODEL)
    expect(row).to_contain_text("0 / 1")

    console.open(page, "Playground")
    page.get_by_label("Model").select_option(DEMO_MODEL)
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill("16")
    page.get_by_label("Message").fill("What is the capital of France?")
    page.get_by_role("button", name="Send").click()
    facts = page.get_by_test_id("facts")
    expect(facts).to_contain_text("cost", timeout=60_000)
    # Whatever the 135M model says: what matters is that it came from the node, token by token.
    expect(page.get_by_test_id("answer")).not_to_be_empty()
    node_id = console.plane.admin.get("/nodes", org="acme")["data"][0]["id"]
    expect(facts.locator('[data-fact="route"]')).to_have_text(f"route {node_id}")
    expect(facts.locator('[data-fact="attempts"]')).to_have_text("attempts 1")
    assert re.fullmatch(r"TTFT \d+ ms|TTFT [\d.]+ s", facts.locator('[data-fact="ttft"]').inner_text())
    assert re.fullmatch(r"tokens/s [\d.]+", facts.locator('[data-fact="tokens_per_s"]').inner_text())
    expect(facts.locator('[data-fact="node"]')).to_have_text(f"node {node_id}")
    assert agent.proc is not None and agent.proc.poll() is None

    console.open(page, "Nodes")
    row.get_by_role("button", name="Drain").click()
    expect(row.locator("[data-state]")).to_have_text("draining")
    row.get_by_role("button", name="Resume").click()
    expect(row.locator("[data-state]")).to_have_text("ready")


def test_a_provider_makes_enrollment_tokens_once_an_org_admin_allows_it(console: Console) -> None:
    provider = console.sign_in("provider")
    expect(provider.get_by_role("heading", level=1)).to_have_text("Nodes")
    enroll = provider.get_by_role("form", name="Enroll a machine")
    enroll.get_by_role("button", name="Create token").click()
    expect(provider.get_by_role("alert")).to_contain_text("providers_may_enroll")
    expect(provider.get_by_test_id("enroll-token")).to_have_count(0)

    admin = console.sign_in("org_admin")
    console.open(admin, "Orgs & members")
    admin.get_by_role("row").filter(has_text="acme").get_by_label("allowed").check()
    eventually(lambda: console.plane.admin.get("/orgs")["data"][0]["providers_may_enroll"] is True)

    enroll.get_by_role("button", name="Create token").click()
    expect(provider.get_by_test_id("enroll-token")).to_contain_text("hwt-")
