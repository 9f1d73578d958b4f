"""S3 endpoint fixture (moto server process on loopback)."""
