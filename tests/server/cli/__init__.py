"""The `hatchway` CLI (server.cli) against a live plane."""
