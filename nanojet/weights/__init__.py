"""Embedded checkpoints and the recipe that builds them (build_tiny.py, importable for its data split)."""
