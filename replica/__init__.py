"""A region's replica: the deterministic fold into RocksDB, block stores and replication."""
