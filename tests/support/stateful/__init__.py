"""Harness for the hypothesis stateful tests: two simulated pools, manual network and signalling."""
