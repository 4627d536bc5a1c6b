"""Targets: the things a request can be served by (an upstream provider now, a node pool later)."""
