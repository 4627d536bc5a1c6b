"""The HTTP front end (server.api): the OpenAI and admin endpoints, errors, headers, validation."""
