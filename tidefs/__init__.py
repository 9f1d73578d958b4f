"""tidefs: a multi-region POSIX file system for AI data.

The metadata log is the source of truth: every mutation is an Avro command
appended to one ordered log per volume, and every region folds that log into
its own RocksDB state. See the layer packages: `tidefs.journal` (commands,
encoding, log backends), `tidefs.replica` (fold, state, blocks, replication)
and `tidefs.fs` (the FUSE mount and the CLI).
"""

__version__ = "0.1.0"
