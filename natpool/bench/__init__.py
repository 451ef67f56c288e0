"""``natpool bench``: natpool measured side by side with raw baselines in one run.

Benchmarks report; they never assert. Timing lives here, not in tests.
"""
