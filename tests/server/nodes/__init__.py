"""The node service (server.nodes): registry and slots, TLS, enrollment, hostile and vanished nodes."""
