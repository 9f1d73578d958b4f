"""Fault injection for tidefs: prove that regions converge and nothing acknowledged is lost.

`python -m chaos run` sets up a volume in two regions for every scenario,
runs a recorded workload on both mounts, injects a fault (a killed mount,
replicator or broker; a region cut off; an S3 endpoint down; a corrupt
block; a full cache disk), heals it, and checks the history and the regions
against each other. See `chaos.scenarios` for the shape of a run and
`chaos.checker` for the invariants.
"""
