"""mycellm: a peer-to-peer network for LLM inference (Ray-free core package)."""

__version__ = "0.1.0"
