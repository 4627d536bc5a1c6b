"""The whole system: planes with real agent processes serving the real model, and real processes end to end."""
