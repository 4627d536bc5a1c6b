"""Usage and billing (server.usage): bounds on claims, the spool, the writer, reports."""
