"""The HTTP API's logic without Ray: OpenAI bodies and responses, serving with failover, metrics."""
