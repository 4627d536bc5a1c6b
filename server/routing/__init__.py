"""Routing and failover: which targets may serve a request, in what order, and what to do when one fails.

    catalog.py       what an org can call right now: the snapshot's providers plus the connected nodes
    rules.py         which targets may serve a model and in what order (the routing rules and strategies)
    health.py        what the plane learns about its targets while serving: breakers, latency, key cool-downs
    failover.py      each failure class (DESIGN §4) mapped onto a move: retry, next target, next model, stop
    hedge.py         a late first token: the next target starts in parallel
    pace.py          when a committed stream has stalled, judged by its own pace
    continuation.py  mid-stream rescue: what a stream delivered, and how a fallback continues it
    waiters.py       tasks waiting for a slot or a connection, woken in arrival order

The attempt loop that applies these lives in server.relay.
"""
