"""Where the database server comes from when none is configured: the embedded PostgreSQL."""
