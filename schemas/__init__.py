"""Avro schemas of every tidefs command (data files, loaded by tidefs.journal.codec)."""
