"""The ``mycellm`` command line."""
