"""Persistent state: SQLModel tables, the engine, migrations, the admin operations over them, the audit log."""
