import os

import pytest
import uvloop

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_asyncio_loop_factories(config, item):
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def e3_cache(tmp_path_factory):
    """A per-run cache so that tests never read a stale model from ~/.cache."""
    path = tmp_path_factory.mktemp("e3-cache")
    os.environ["E3_CACHE"] = str(path)
    return path
