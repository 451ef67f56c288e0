"""Hypothesis profiles and the markers of this suite.

Hypothesis: ``ci`` (derandomized, bounded) and ``thorough`` (local, heavy);
select with ``HYPOTHESIS_PROFILE=ci|thorough``; the default is ``dev``.

Markers are registered here rather than in pyproject.toml so that the suite
also runs from a copy of ``tests/`` outside the checkout, against an installed
wheel (CI does that). Tests marked ``needs_source`` read the source checkout;
they are skipped when natpool is not imported from one.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

from natpool.resources import source_root

settings.register_profile("ci", derandomize=True, max_examples=60, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
# too_slow is suppressed in every profile: the stateful programs are long by design, and on a loaded or noisy
# machine the health check fails a plain `pytest` (the README's command) for the machine's speed, not a bug.
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: longer runs, excluded from nothing but marked for visibility")
    config.addinivalue_line("markers", "needs_source: reads the source checkout; skipped against an installed wheel")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if source_root() is not None:
        return
    skip = pytest.mark.skip(reason="needs the source checkout; natpool runs from an installed package")
    for item in items:
        if "needs_source" in item.keywords:
            item.add_marker(skip)
