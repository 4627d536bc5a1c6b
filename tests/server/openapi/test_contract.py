"""The plane answers as /openapi.json says: Schemathesis, against a real plane on loopback.

Schemathesis reads the document the plane serves and sends every operation its examples, its coverage cases
(boundaries, missing and wrong-typed fields, unexpected methods) and a bounded number of generated requests,
valid and invalid, with the admin key on the admin API and an API key on /v1 (the org's provider is a mock
upstream, so no real provider is needed). A run fails on any 5xx, any answer whose status, content type or body
the document does not describe, and any request the document says is invalid that the plane accepts.

The run is deterministic (a fixed seed): CI sees what a developer sees. What it found was fixed at its source,
and each is held by a focused test at the end of this file.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.engine import Status, events

from server.openapi import document
from server.storage.policy import MAX_LIMIT
from tests.conftest import ADMIN_KEY, MODEL, Gateway, RunningPlane

# Generated requests per operation in the fuzzing phase (the examples and coverage phases add their own).
MAX_EXAMPLES = 5
SEED = 20


def _config(gateway: Gateway) -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "base-url": gateway.plane.url,
            "seed": SEED,
            "continue-on-failure": True,
            "request-timeout": 30,
            # Nothing kept between runs (no example database, no cache), so every run is the same run.
            "generation": {"max-examples": MAX_EXAMPLES, "mode": "all", "database": "none"},
            "cache": {"enabled": False},
            # Stateful sequences would revoke the key or remove the provider the rest of the run relies on.
            "phases": {"stateful": {"enabled": False}},
            "auth": {"openapi": {"adminKey": {"bearer": ADMIN_KEY}, "apiKey": {"bearer": gateway.api_key}}},
            "checks": {
                # A schema cannot say everything a handler checks (a date in the past, an org that exists, a
                # provider a route names, a reachable URL): a schema-valid request may still get its 400. The
                # other direction holds: whatever the document refuses, the plane refuses.
                "positive_data_acceptance": {"enabled": False},
                # A refusal is any 4xx that says why: 413 for a body over the plane's size limit included.
                "negative_data_rejection": {"expected-statuses": [400, 401, 403, 404, 405, 409, 413, 415, 422, 429]},
            },
            "operations": [
                {
                    # OpenAI's request schemas yield thousands of coverage cases (7,000 for /v1/responses alone):
                    # these get their examples and generated bodies, and tests/server/api/test_request_validation.py
                    # holds the plane to the schemas field by field.
                    "include-path-regex": "^/v1/(chat/completions|completions|responses)$",
                    "phases": {"coverage": {"enabled": False}},
                },
                {
                    # The plane stores no responses and answers 404 to any method there, on purpose (it names
                    # what to do instead), rather than 405 for the methods OpenAI's API does not have.
                    "include-path-regex": "^/v1/responses/",
                    "checks": {"unsupported_method": {"enabled": False}},
                },
            ],
        }
    )


def _failures(event: Any) -> list[str]:
    """What one finished scenario got wrong: each failed check with the request that shows it."""
    found = []
    for checks in event.recorder.checks.values():
        for check in checks:
            if check.failure_info is not None:
                failure = check.failure_info.failure
                found.append(f"{failure.title}: {failure.message}\n    {check.failure_info.code_sample}")
    return found


def _served_model(context: Any, body: Any) -> Any:
    """A /v1 body's model, when it is a valid one, becomes the model the org serves: the request then goes the
    whole way, through the relay to the mock upstream and back, rather than stopping at 404 model_not_found.
    A body that names no valid model keeps what it named, so what was meant to be refused still is."""
    on_v1 = context.operation is not None and context.operation.path.startswith("/v1/")
    if on_v1 and isinstance(body, dict) and isinstance(body.get("model"), str) and body["model"].strip():
        body["model"] = MODEL
    return body


# About 30 s on an idle two-core machine: the work is bounded by MAX_EXAMPLES and the coverage cases, and the
# limit only allows for a machine busy with other jobs.
@pytest.mark.timeout(300)
def test_the_plane_answers_as_its_document_says(gateway: Gateway) -> None:
    schema = schemathesis.openapi.from_url(f"{gateway.plane.url}/openapi.json", config=_config(gateway))
    schema.hook("map_body")(_served_model)
    problems: list[str] = []
    tested: set[str] = set()
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            tested.add(event.recorder.label)
            if event.status in (Status.FAILURE, Status.ERROR):
                problems.extend(f"[{event.recorder.label}] {f}" for f in dict.fromkeys(_failures(event)))
        elif isinstance(event, events.NonFatalError):
            problems.append(f"[{event.label}] {event.info.title}: {event.info.message}")
        elif isinstance(event, events.FatalError):
            raise event.exception
    # Every operation was exercised (but the document's own, which Schemathesis leaves out), and generated
    # requests went the whole way to the upstream, not only the four examples.
    operations = {f"{method.upper()} {path}" for path, item in document.document()["paths"].items() for method in item}
    assert tested == operations - {"GET /openapi.json"}
    assert len(gateway.upstream.requests) > 4
    assert not problems, "\n".join(problems)


# -- what the run found, each fixed at its source and held here by a focused test ---------------------------

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _refusal(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error


def test_a_response_request_without_a_model_is_refused(gateway: Gateway) -> None:
    # OpenAI's CreateResponse leaves `model` optional; the plane read body["model"] and answered 500.
    response = httpx.post(f"{gateway.plane.v1}/responses", json={"input": "Say hello"}, headers=gateway.auth())
    assert _refusal(response)["param"] == "model"


def test_a_cache_ttl_past_what_storage_holds_is_refused(plane: RunningPlane) -> None:
    # 2**63 seconds overflowed the column at commit: a 500.
    plane.create_org("acme")
    too_long = httpx.put(f"{plane.url}/admin/v1/cache", json={"org": "acme", "ttl_s": MAX_LIMIT + 1}, headers=ADMIN)
    assert _refusal(too_long)["param"] == "ttl_s"
    longest = httpx.put(f"{plane.url}/admin/v1/cache", json={"org": "acme", "ttl_s": MAX_LIMIT}, headers=ADMIN)
    assert longest.status_code == 200
    assert longest.json()["ttl_s"] == MAX_LIMIT


def test_an_org_given_twice_must_be_strings_both(plane: RunningPlane) -> None:
    # `org_id` was read and `org` (its alias) ignored, whatever it held.
    org = plane.create_org("acme")
    body = {"email": "dev@example.com", "role": "developer", "password": "a long password", "org_id": org["id"]}
    response = httpx.post(f"{plane.url}/admin/v1/accounts", json={**body, "org": {}}, headers=ADMIN)
    assert _refusal(response)["param"] == "org"
    assert httpx.post(f"{plane.url}/admin/v1/accounts", json=body, headers=ADMIN).status_code == 201


def test_a_provider_url_python_cannot_split_is_refused(plane: RunningPlane) -> None:
    # urlsplit raises on an unbalanced or invalid [IPv6] host: a 500. A port out of range was stored, and every
    # request to the provider failed later.
    plane.create_org("acme")
    body = {"org": "acme", "name": "p", "api_keys": ["sk-x"], "models": ["m"]}
    for url in ("https://[5", "http://[zz]/v1", "http://upstream:99999/v1"):
        response = httpx.post(f"{plane.url}/admin/v1/providers", json={**body, "base_url": url}, headers=ADMIN)
        assert _refusal(response)["param"] == "base_url"
