"""The admin API's HTTP client, used by the CLI (and by anyone scripting the plane in Python)."""

from __future__ import annotations

from typing import Any

import httpx


class AdminAPIError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} (HTTP {status})")
        self.status = status


class AdminClient:
    def __init__(self, url: str, admin_key: str, timeout_s: float = 30.0) -> None:
        self._http = httpx.Client(
            base_url=url.rstrip("/") + "/admin/v1",
            headers={"Authorization": f"Bearer {admin_key}"},
            timeout=timeout_s,
        )

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, json: Any = None, params: dict[str, str] | None = None) -> Any:
        try:
            response = self._http.request(method, path, json=json, params=params)
        except httpx.HTTPError as exc:
            raise AdminAPIError(0, f"cannot reach the plane at {self._http.base_url}: {exc}") from exc
        try:
            doc = response.json()
        except ValueError:
            doc = None
        if response.is_error:
            message = doc["error"]["message"] if isinstance(doc, dict) and "error" in doc else response.text
            raise AdminAPIError(response.status_code, message)
        return doc

    def get(self, path: str, **params: str | None) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, json=body)

    def put(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("PUT", path, json=body)

    def patch(self, path: str, body: dict[str, Any], **params: str | None) -> Any:
        return self.request("PATCH", path, json=body, params={k: v for k, v in params.items() if v is not None})

    def delete(self, path: str, **params: str | None) -> Any:
        return self.request("DELETE", path, params={k: v for k, v in params.items() if v is not None})
