"""The profiler on a small real torch EE model (the interface only; no trained weights needed)."""
import pytest
import torch
from torch import nn

from e3.models.base import EarlyExitModel, InputKind, ModelMeta
from e3.models.policies import make_policy
from e3.models.state import BatchState, FieldSpec, StateSpec
from e3.planner.errors import ProfileError
from e3.planner.profiler import cache_key, cached_profile, load_cached, measure_transfer, profile_model, save_cached

WIDTH, BLOCKS = 256, 4


class TinyEE(EarlyExitModel):
    """Residual MLP blocks with a ramp after blocks 0 and 2; counts its block calls."""

    def __init__(self):
        torch.manual_seed(0)
        self.layers = [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU()) for _ in range(BLOCKS)]
        self.exits = [nn.Linear(WIDTH, 3) for _ in range(3)]
        spec = StateSpec((FieldSpec("hidden", (WIDTH,), torch.float32),))
        self.meta = ModelMeta("tiny", "test", BLOCKS, (0, 2), 3, ("a", "b", "c"), InputKind.TENSOR, (WIDTH,),
                              spec, (spec,) * BLOCKS)
        self.calls = 0

    def encode(self, inputs):
        return BatchState({"hidden": torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in inputs])})

    def run(self, first, last, state):
        self.calls += 1
        h = state["hidden"]
        for layer in self.layers[first:last + 1]:
            h = h + layer(h)
        return state.replace(hidden=h)

    def ramp(self, k, state):
        return self.exits[k](state["hidden"])

    def head(self, state):
        return self.exits[-1](state["hidden"])

    def to(self, device):
        return self


@pytest.fixture(scope="module")
def tiny():
    return TinyEE()


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as a CPU worker runs: two threads on a busy 2-core machine wait on each other
    for whole scheduler slices (~8 ms), which is noise, not the model."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_profile_covers_every_block_ramp_and_batch(tiny):
    prof = profile_model(tiny, make_policy("entropy", 0.2), batch_sizes=[1, 8, 32], repeats=5, warmup=1)
    assert len(prof.block_s) == BLOCKS and len(prof.ramp_s) == 2 and len(prof.head_s) == 3
    assert all(v > 0 for row in prof.block_s + prof.ramp_s + [prof.head_s] for v in row)
    assert prof.device == "cpu-1t" and prof.meta["threads"] == 1
    assert prof.meta["dtype"] == "float32" and prof.meta["input_shape"] == f"hidden:[{WIDTH}]:float32"
    # batching pays on a matrix multiply: 32 rows cost far less than 32 single rows
    assert prof.block(0, 32) < 16 * prof.block(0, 1)
    # interpolation between measured sizes, per-sample extrapolation beyond them
    assert min(prof.block(1, 8), prof.block(1, 32)) <= prof.block(1, 16) <= max(prof.block(1, 8), prof.block(1, 32))
    assert prof.block(1, 64) == pytest.approx(2 * prof.block(1, 32))
    assert prof.transfer(10_000_000) > prof.transfer(0) >= 0


def test_real_inputs_can_drive_the_profile(tiny):
    inputs = [torch.randn(WIDTH).tolist() for _ in range(3)]
    prof = profile_model(tiny, None, batch_sizes=[1, 4], repeats=3, warmup=1, inputs=inputs)
    assert prof.meta["inputs"] == "real" and all(v > 0 for v in prof.head_s)


def test_injected_clock_times_the_least_of_the_repeats():
    """Each timed call spans the next of these durations: interference only adds, so the least counts."""
    durations = iter([5, 1, 9] * 1000)
    now = [0.0]

    def clock():                      # called at the start and the end of every timed call
        clock.calls += 1
        if clock.calls % 2 == 0:
            now[0] += next(durations) * 0.001
        return now[0]
    clock.calls = 0
    prof = profile_model(TinyEE(), None, batch_sizes=[2], repeats=3, warmup=0, clock=clock, transfer="same-device")
    assert prof.block_s[0][0] == pytest.approx(0.001) and prof.meta["statistic"] == "least"
    assert (prof.transfer_fixed_s, prof.transfer_s_per_byte) == (0.0, 0.0)


def test_transfer_kinds():
    fixed, per_byte = measure_transfer(1 << 20, "same-host")
    assert fixed > 0 and per_byte > 0
    assert measure_transfer(1 << 20, "same-device") == (0.0, 0.0)
    with pytest.raises(ProfileError, match="cross-host"):
        measure_transfer(1 << 20, "cross-host")


def test_disk_cache_hits_and_keys(tmp_path):
    model = TinyEE()
    first = cached_profile(model, None, "tiny-v1", batch_sizes=[1, 4], cache=tmp_path, repeats=3, warmup=1)
    calls = model.calls
    again = cached_profile(model, None, "tiny-v1", batch_sizes=[1, 4], cache=tmp_path, repeats=3, warmup=1)
    assert model.calls == calls and again.block_s == first.block_s       # served from disk
    assert len(list(tmp_path.glob("*.json"))) == 1
    keys = {cache_key("tiny-v1", "cpu-1t", [1, 4]), cache_key("tiny-v2", "cpu-1t", [1, 4]),
            cache_key("tiny-v1", "cpu-2t", [1, 4]), cache_key("tiny-v1", "cpu-1t", [1, 8]),
            cache_key("tiny-v1", "cpu-1t", [1, 4], {"input": "seq 32"})}
    assert len(keys) == 5


def test_a_model_directory_is_keyed_by_its_manifest(tmp_path):
    (tmp_path / "e3-model.json").write_text('{"family": "resnet"}')
    k1 = cache_key(tmp_path, "cpu-1t", [1])
    (tmp_path / "e3-model.json").write_text('{"family": "resnet", "retrained": 1}')
    assert cache_key(tmp_path, "cpu-1t", [1]) != k1


def test_corrupt_cache_files_are_ignored(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{not json")
    assert load_cached(path) is None
    prof = profile_model(TinyEE(), None, batch_sizes=[1], repeats=1, warmup=0, transfer="same-device")
    save_cached(path, prof)
    assert load_cached(path).block_s == prof.block_s
