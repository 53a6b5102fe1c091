"""The benchmark: `python bench/run.py [--quick]` (see README, Performance)."""
