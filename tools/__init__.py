"""Benchmarks and plotting tools, run from a checkout: python -m tools.NAME."""
