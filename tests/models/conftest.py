import pytest
import torch

from e3.models.registry import load_model, resolve


@pytest.fixture(scope="session")
def default_model_dir(e3_cache):
    """The built-in default model, trained once per test session into the test cache."""
    return resolve("digits")


@pytest.fixture(scope="session")
def default_dir(default_model_dir):
    """Older name of default_model_dir."""
    return default_model_dir


@pytest.fixture(scope="session")
def default_model(default_model_dir):
    """The default model loaded with its recommended policy (a registry.LoadedModel)."""
    return load_model(default_model_dir)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test. For tests that check answers, not speed: on a
    2-core machine that something else keeps busy, two threads run a small conv net
    20-40x slower than one (each parallel region waits for a descheduled thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
