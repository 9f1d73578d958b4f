"""The FUSE file system, its data path, and the tidefs command line."""
