"""Alembic environment: migrations run on the connection that Store.open hands over."""

from alembic import context

from mycellm.ledger.tables import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("mycellm migrations run through mycellm.ledger.store.Store.open")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
