"""The node's store: served requests now, credits and receipts later (SQLAlchemy 2 async)."""
