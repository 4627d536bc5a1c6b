"""Routing and failover (server.routing, and the relay's attempt loop over them)."""
