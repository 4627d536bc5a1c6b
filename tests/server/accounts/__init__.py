"""Accounts, roles and console sessions (server.accounts)."""
