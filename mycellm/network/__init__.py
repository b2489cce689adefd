"""Links between nodes: wire messages, QUIC, sessions, the peer registry, forwarding, payment."""
