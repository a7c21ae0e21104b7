import pytest

from e3.models.registry import resolve


@pytest.fixture(scope="session")
def default_dir(e3_cache):
    """The built-in default model, trained once per test session into the test cache."""
    return resolve("digits")
