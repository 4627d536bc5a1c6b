"""State several planes share through Redis (server.shared)."""
