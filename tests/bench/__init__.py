"""Tests of natpool.bench: the ``natpool bench`` sections this suite can afford."""
