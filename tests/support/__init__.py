"""Helpers shared by the tests (imported as ``tests.support.<module>``); no tests live here."""

from pathlib import Path

# The checker's saved traces (data, not code): replayed by tests/core/test_handover_replay.py and re-checked by
# tests/check/test_check.py. One name for the place, so neither test spells a path relative to its own directory.
COUNTEREXAMPLES = Path(__file__).resolve().parents[1] / "counterexamples"
