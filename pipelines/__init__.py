"""Pipeline mains, installed beside cg_tf: python -m pipelines.NAME from any directory."""
