"""GET /openapi.json: a valid OpenAPI 3.1 document that names every route the plane registers, and only those;
GET /api-reference: the page that renders it, under a strict Content-Security-Policy."""

from __future__ import annotations

import re
from typing import Any

import httpx
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from openapi_spec_validator import validate

from server.api.schema import COMPONENTS
from server.openapi import document
from server.openapi.reference import CONTENT_SECURITY_POLICY
from tests.conftest import RunningPlane

METHODS = ("get", "post", "put", "patch", "delete")


def _app(plane: RunningPlane) -> web.Application:
    app = plane.server.runner.app
    assert isinstance(app, web.Application)
    return app


def _registered(app: web.Application) -> dict[tuple[str, str], web.AbstractRoute]:
    """Every API route, as (method, path pattern); HEAD goes with its GET, browser pages are not API."""
    routes = {}
    for route in app.router.routes():
        resource = route.resource
        assert resource is not None
        if route.method == "HEAD" or document.is_page(resource.canonical):
            continue
        routes[(route.method, resource.canonical)] = route
    return routes


def _sample(path: str) -> str:
    """A concrete URL for a documented path: each parameter filled in."""
    return re.sub(r"{[^}]+}", "sample-id", path)


def _documented(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(method, path) for path, item in doc["paths"].items() for method in METHODS if method in item]


async def _resolve(app: web.Application, method: str, path: str) -> web.AbstractRoute | None:
    match = await app.router.resolve(make_mocked_request(method.upper(), _sample(path)))
    return None if match.http_exception is not None else match.route


def test_the_plane_serves_the_document(plane: RunningPlane) -> None:
    response = httpx.get(f"{plane.url}/openapi.json")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json() == document.document()


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = document.document()
    assert doc["openapi"].startswith("3.1")
    validate(doc)


async def test_every_registered_route_is_documented(plane: RunningPlane) -> None:
    app = _app(plane)
    covered = set()
    for method, path in _documented(document.document()):
        route = await _resolve(app, method, path)
        if route is not None:
            covered.add(route)
    missing = sorted(key for key, route in _registered(app).items() if route not in covered)
    assert not missing, f"routes the plane registers that /openapi.json does not document: {missing}"


async def test_every_documented_operation_is_registered(plane: RunningPlane) -> None:
    app = _app(plane)
    unserved = [
        (method.upper(), path)
        for method, path in _documented(document.document())
        if await _resolve(app, method, path) is None
    ]
    assert not unserved, f"operations /openapi.json documents that the plane does not route: {unserved}"


def test_openai_bodies_are_the_schemas_the_plane_validates_with() -> None:
    doc = document.document()
    for endpoint, component in COMPONENTS.items():
        body = doc["paths"][f"/v1/{endpoint}"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        # OpenAI's schema, as vendored, and beside it only the plane's own rules.
        assert body["allOf"][0] == {"$ref": f"#/components/schemas/{component}"}
        assert body["allOf"][1:] == list(document.PLANE_RULES[endpoint])
        assert component in doc["components"]["schemas"]


def test_every_error_answer_is_the_shared_envelope() -> None:
    doc = document.document()
    shared = {f"#/components/responses/{name}" for name, _ in document.ERROR_RESPONSES.values()}
    for method, path in _documented(doc):
        for status, answer in doc["paths"][path][method]["responses"].items():
            if int(status) >= 400:
                assert answer.get("$ref") in shared, f"{method.upper()} {path} {status}"
    for name, _ in document.ERROR_RESPONSES.values():
        schema = doc["components"]["responses"][name]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/Error"}


def test_the_document_is_built_once() -> None:
    assert document.document() is document.document()
    assert document.body() is document.body()


def test_the_api_reference_page_runs_under_a_strict_policy(plane: RunningPlane) -> None:
    page = httpx.get(f"{plane.url}/api-reference")
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assert page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self';" in CONTENT_SECURITY_POLICY and "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY
    # Only the plane's own assets: nothing from another host, nothing inline.
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and all(s.startswith("/") and not s.startswith("//") for s in sources)
    assert "<style" not in page.text and "style=" not in page.text
    scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", page.text, re.S)
    assert scripts == [""] and page.text.count("<script") == 1
    for asset in ("/api-reference/reference.js", "/api-reference/reference.css"):
        assert asset in sources
        answer = httpx.get(f"{plane.url}{asset}")
        assert answer.status_code == 200
        assert answer.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    script = httpx.get(f"{plane.url}/api-reference/reference.js")
    assert script.headers["Content-Type"].startswith("text/javascript")
    assert 'fetch("/openapi.json"' in script.text
    assert "innerHTML" not in script.text  # the document's text is never parsed as HTML


def test_the_api_reference_serves_only_its_own_assets(plane: RunningPlane) -> None:
    for name in ("index.html", "..%2Fdocument.py", "missing.js"):
        answer = httpx.get(f"{plane.url}/api-reference/{name}")
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "not_found"
