import pytest

from e3.models.registry import resolve


@pytest.fixture(scope="session")
def default_dir(e3_cache):
    """The built-in default model, trained once per test session into the test cache."""
    return resolve("digits")


@pytest.fixture(scope="session")
def minilm_dir(e3_cache):
    """The built-in default model (MiniLM on short texts), trained once per test session."""
    return resolve("default")
