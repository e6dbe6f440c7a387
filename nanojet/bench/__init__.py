"""Benchmarking (an extra, not the runtime): what bench.py measures beyond tokens/s (hardware bandwidth, MoE
experts touched, serving under load), synthetic targets in published shapes, prompt sets and the report."""
