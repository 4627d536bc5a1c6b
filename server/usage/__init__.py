"""Usage and billing: what a request is billed, and its row's way to the database off the request path.

metering.py     what a request is billed: the usage a target reports, held to bounds the plane computes
spool.py        every usage row on disk before its request completes, until the row is in the database
writer.py       the bounded queue of usage rows and the one batch writer that drains it
reports.py      usage reports: requests, tokens, cost and latency grouped by model, route, key, node or day
"""
