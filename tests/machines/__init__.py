"""Tests of natpool.machines: the compiled tables against the generated python-statemachine classes."""
