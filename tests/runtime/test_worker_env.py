"""OpenMP's wait policy for CPU worker processes (workers.omp_wait_policy)."""
import os

import pytest

from e3.runtime.config import WorkersConfig
from e3.runtime.worker_client import worker_env


@pytest.fixture
def cores(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    return 2


def test_auto_sleeps_when_the_workers_threads_fill_the_cores(cores):
    assert worker_env(2, 1)["OMP_WAIT_POLICY"] == "PASSIVE"
    assert worker_env(1, 2).get("OMP_WAIT_POLICY") is None     # one thread: no barrier to spin at


def test_auto_leaves_spinning_on_when_cores_are_spare(cores, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert worker_env(2, 2)["OMP_WAIT_POLICY"] == "ACTIVE"


def test_an_explicit_policy_and_the_environment_win(cores, monkeypatch):
    assert worker_env(2, 1, "active")["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    assert worker_env(2, 1, "passive")["OMP_WAIT_POLICY"] == "active"


def test_a_bad_policy_is_refused_by_name():
    with pytest.raises(ValueError, match="workers.omp_wait_policy must be .* got 'spin'"):
        WorkersConfig(omp_wait_policy="spin").validate()
