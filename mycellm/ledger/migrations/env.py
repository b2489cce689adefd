"""Alembic environment: migrations run on the connection that Store.open hands over."""

from alembic import context
from sqlalchemy import text

from mycellm.ledger.tables import Base

# Any 64-bit number, the same in every process that migrates this schema ("mycellm" in ASCII).
MIGRATION_LOCK_KEY = 0x6D7963656C6C6D

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("mycellm migrations run through mycellm.ledger.store.Store.open")
# Several processes may open one database at once: the first one migrates, the others wait for it
# and then find the schema at head. The lock is taken before Alembic reads the current version.
if connection.dialect.name == "postgresql":
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
elif connection.dialect.name == "sqlite":
    # pysqlite begins a transaction only before INSERT/UPDATE/DELETE, so DDL would run and commit
    # on its own: BEGIN IMMEDIATE takes the write lock now and makes the upgrade one transaction.
    connection.exec_driver_sql("BEGIN IMMEDIATE")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
