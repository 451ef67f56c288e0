"""Tests of natpool.sim: the simulator itself and real pools driven by it."""
