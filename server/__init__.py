"""Hatchway control plane: the OpenAI-compatible HTTP front end, policy, routing and storage.

api/        the HTTP front end: routes, middleware, the /v1 and /admin/v1 handlers, request validation
serving/    processes, sockets and connections; load shedding
policy/     keys, limits, quotas and the cache, read from the in-memory snapshot
routing/    which targets serve a request and in what order; failover, hedging, stalls, rescue
relay/      the attempt loop: from an admitted request to the answer and its usage row
targets/    what a request is sent to: upstream providers and node pools
nodes/      enrolled machines: the gRPC service they dial, their registry, slots and TLS
responses/  /v1/responses on targets that speak only chat completions
usage/      billing, the usage spool and writer, reports
storage/    the database: tables, migrations, the admin operations over them, the audit log
shared/     state several planes share through Redis (limits, cache)
fleet/      several planes over one broker: nodes connected to one plane serving another's requests
accounts/   people: accounts, roles, sessions, invitations, admin tokens
console/    the web console's pages and the endpoints only it uses
openapi/    the OpenAPI document and its rendered reference
cli/        `hatchway`: serve, the admin commands, the demo

config.py   the one typed configuration          errors.py   the one error hierarchy, as the OpenAI envelope
plane.py    every long-lived part and its owner   metrics.py  Prometheus metrics, one registry per plane
credentials.py, redact.py, ids.py, sse.py: secrets, masking, ids, server-sent events
"""

__version__ = "0.1.0"
