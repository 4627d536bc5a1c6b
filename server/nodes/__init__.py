"""Nodes: enrolled machines running the Hatchway agent, reached over the gRPC streams they open."""
