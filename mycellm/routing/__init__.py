"""Which route answers a request: ranking of local, peer (and later chain and fleet) routes."""
