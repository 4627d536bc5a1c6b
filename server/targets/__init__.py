"""Targets: what a request can be served by: an upstream OpenAI-compatible provider or a pool of nodes."""
