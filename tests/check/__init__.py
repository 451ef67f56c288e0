"""Tests of natpool.check: the model checker, its mutants and the TLA+ export it is compared with."""
