"""Trainers: students from a cache (streaming loader, sparse KD losses, one training loop), on the store only."""
