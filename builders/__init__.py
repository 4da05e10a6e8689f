"""Builders: batch teacher inference into a cache (one driver; backends that turn token batches into sparse
distributions; data, generation and verifiers), on the store only."""
