"""Nodes across planes over NATS (server.fleet)."""
