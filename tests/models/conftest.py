import pytest

from e3.models.registry import load_model, resolve


@pytest.fixture(scope="session")
def default_dir(e3_cache):
    """The built-in default model, trained once per test session into the test cache."""
    return resolve("default")


@pytest.fixture(scope="session")
def default_model(default_dir):
    return load_model(default_dir)
