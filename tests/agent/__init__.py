"""The agent's own tests (agent/): the engine against the real model, sampling, tools, grammars, hardware,
idle policy, services."""
