"""Pipeline mains, run from a checkout: python -m pipelines.NAME."""
