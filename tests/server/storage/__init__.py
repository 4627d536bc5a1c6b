"""Storage (server.storage): what lands on disk, migrations, PostgreSQL, the audit log."""
