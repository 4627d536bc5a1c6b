"""The OpenAPI document (server.openapi) and the plane checked against it."""
