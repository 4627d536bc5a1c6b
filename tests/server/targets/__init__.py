"""Targets (server.targets): the upstream HTTP client, egress, transport errors, node answers."""
