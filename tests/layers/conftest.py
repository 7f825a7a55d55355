import pytest


@pytest.fixture(autouse=True)
def _uninitialised_memory_is_nan(nan_empty):
    """Every test here runs with NaN-filled scratch memory (`nan_empty` in tests/conftest.py)."""
