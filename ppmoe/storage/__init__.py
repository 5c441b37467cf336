"""Checkpoint files below any model: manifests (sizes, checksums, verification) and write/read failures."""
