"""Persistent state: SQLModel tables, the engine, migrations, and the admin operations over them."""
