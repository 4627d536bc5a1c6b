"""OpenAI's published request schemas, vendored (see vendor.py for where from and how they were cut)."""
