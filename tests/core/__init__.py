"""Tests of natpool.core: the sans-IO entry, pool and handover sessions, in explicit or virtual time."""
