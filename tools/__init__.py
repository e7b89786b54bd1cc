"""Benchmarks, plots and the studies' measurements, installed beside cg_tf:
python -m tools.NAME from any directory (tools.check_results checks a checkout's
READMEs)."""
