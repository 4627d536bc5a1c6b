"""State several planes share, so that N plane processes behave as one gateway.

This package owns what lives outside any one plane's memory: rate limits, concurrency and token/USD quotas held
in Redis (`redis_limits`), decided by Lua scripts that run atomically on the Redis server. With no Redis
configured nothing here is used and each plane keeps its in-process counters (server.policy.limits).
"""
