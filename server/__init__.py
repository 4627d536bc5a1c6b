"""Hatchway control plane: the OpenAI-compatible HTTP front end, policy, routing and storage."""

__version__ = "0.1.0"
