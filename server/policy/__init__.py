"""Policy: who may call, how much, and what may be answered from the cache, read from memory on the request path.

    snapshot.py     the in-memory snapshot of keys, orgs, providers, routes, limits and prices the request path
                    reads instead of the database, rebuilt when an admin change is announced
    declarative.py  orgs and providers declared in the TOML config file, applied at every start
    auth.py         bearer-key authentication against the snapshot (a hash and a dict lookup)
    limits.py       rate limits and quotas per key and per org, exact under concurrency
    cache.py        the exact-match response cache

server.shared holds the Redis-backed limits and cache that several planes share.
"""
