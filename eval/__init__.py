"""Evaluation scripts and metrics (reconstruction, EgoSchema, generation)."""
