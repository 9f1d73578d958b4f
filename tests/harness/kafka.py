"""Kafka broker fixture (KRaft, started from the jars that scripts/fetch-kafka resolves)."""
