"""The HTTP front end: the aiohttp application, its routes, and what every request passes before the relay.

app.py          every route in one place; the plane's lifetime tied to the application's
middleware.py   the outer layer of each request: request id, metrics, any error rendered as the OpenAI envelope
openai_api.py   /v1/*: the named steps of a request (authenticate, validate, admit, route, relay)
admin_api.py    /admin/v1/*: the admin API the CLI and the console call, each handler behind a permission
ops.py          /healthz, /readyz, /metrics
validation.py   request-body checks before anything is sent anywhere
schema.py       OpenAI's published request schemas, compiled once, their verdicts turned into client errors
"""
