"""The metadata log: commands, their Avro encoding, and the log backends."""
