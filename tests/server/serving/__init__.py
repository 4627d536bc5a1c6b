"""Running the plane (server.serving): processes, connections, load shedding, shutdown."""
