"""Test configuration.

pullback_manifold is imported first: it selects geomstats' pytorch backend and
patches numpy 2.4's missing ``trapz`` before anything imports geomstats. The
hooks re-exported from ``geomstats.test.conf`` make pytest skip the geomstats
test-case methods that have no ``*_test_data`` (otherwise collected and failing
with "fixture not found").
"""

import os

import pullback_manifold  # noqa: F401  (must come before geomstats)
import pytest
import torch
from geomstats.test.conf import pytest_collection_modifyitems, pytest_make_parametrize_id  # noqa: F401


if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per worker: the workers share the cores (no oversubscription)
    torch.set_num_threads(1)


@pytest.fixture
def float64_default():
    """Run a test with torch's default dtype set to float64, then restore it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
