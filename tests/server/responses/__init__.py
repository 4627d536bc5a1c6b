"""/v1/responses (server.responses) on every kind of target."""
