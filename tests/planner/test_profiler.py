"""The profiler on the real default model."""
import pytest
import torch

from e3.planner.profiler import cache_key, load_cached, profile_model, save_cached


@pytest.fixture(scope="module")
def default_model(e3_cache):
    from e3.models.registry import load_model
    return load_model("default")


def test_profile_covers_every_block_ramp_and_batch(default_model, tmp_path):
    torch.set_num_threads(1)
    prof = profile_model(default_model.model, default_model.policy, batch_sizes=[1, 8, 32], repeats=3, warmup=1)
    meta = default_model.model.meta
    assert len(prof.block_s) == meta.num_blocks and len(prof.ramp_s) == meta.num_ramps
    assert all(v > 0 for row in prof.block_s for v in row)
    # batching pays: 32 rows cost far less than 32 single rows
    assert prof.block(0, 32) < 32 * prof.block(0, 1)
    assert prof.block(0, 16) == pytest.approx((prof.block(0, 8) + prof.block(0, 32)) / 2, rel=0.7)
    assert prof.transfer(10_000) > prof.transfer(0) >= 0
    path = tmp_path / f"{cache_key(default_model.path, prof.device, [1, 8, 32], {})}.json"
    save_cached(path, prof)
    assert load_cached(path).block_s == prof.block_s
