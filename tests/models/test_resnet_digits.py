"""The ResNet family and the built-in default model (real digits, real weights)."""
import json
import time

import pytest
import torch

from e3.models.errors import CheckpointError, InvalidInputError, ModelNotFoundError
from e3.models.evaluation import all_exit_logits, exit_report
from e3.models.registry import MANIFEST, load_model, read_manifest, resolve
from e3.models.resnet import ResNetArch, ResNetEE, ResNetNet, save
from e3.runtime.examples import load_examples


def test_meta_matches_what_the_blocks_produce(default_model):
    model = default_model.model
    state = model.encode(load_examples(default_model.path, 3)[0])
    for b, spec in enumerate(model.meta.boundary_specs):
        state = model.run(b, b, state)
        state.check(spec, f"after block {b}")
    assert model.meta.boundary_bytes(0) == 32 * 8 * 8 * 4


def test_rows_are_independent(default_model):
    model = default_model.model
    xs = load_examples(default_model.path, 16)[0]
    with torch.inference_mode():
        together = model.head(model.run(0, model.meta.num_blocks - 1, model.encode(xs)))
        alone = torch.cat([model.head(model.run(0, model.meta.num_blocks - 1, model.encode([x]))) for x in xs])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_save_and_load_give_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = ResNetEE(ResNetNet(ResNetArch(blocks=((8, 1), (16, 2)), ramp_blocks=(0,), groups=4)), "tiny")
    save(model, tmp_path)
    again = load_model(tmp_path)
    x = [torch.rand(64).tolist() for _ in range(3)]
    with torch.inference_mode():
        a = model.ramp(0, model.run(0, 0, model.encode(x)))
        b = again.model.ramp(0, again.model.run(0, 0, again.model.encode(x)))
    assert torch.equal(a, b) and again.model.meta.ramp_blocks == (0,)


@pytest.mark.parametrize("bad,message", [
    ([[0.0] * 63], r"input 0 has shape \(63,\); expected \(1, 8, 8\) or 64 values"),
    ([[0.0] * 64, "x" * 64], "input 1 is not numeric"),
    ([[float("nan")] * 64], "input 0 holds NaN"),
    ([], "no inputs given"),
])
def test_bad_inputs_are_named(default_model, bad, message):
    with pytest.raises(InvalidInputError, match=message):
        default_model.model.encode(bad)


def test_missing_or_mismatched_weights_are_checkpoint_errors(tmp_path, default_dir):
    with pytest.raises(ModelNotFoundError, match="is not a directory"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="has no e3-model.json"):
        load_model(tmp_path)
    manifest = read_manifest(default_dir)
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((default_dir / "model.safetensors").read_bytes())
    manifest["arch"]["stem_channels"] = 16
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="does not match the manifest's arch"):
        load_model(tmp_path)
    (tmp_path / MANIFEST).write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(tmp_path)


def test_default_model_is_cached(default_dir):
    start = time.perf_counter()
    assert resolve("default") == default_dir
    assert time.perf_counter() - start < 1.0


def test_default_model_exits_for_real(default_model):
    """Held-out digits at the recommended threshold: real early exits, no accuracy bought."""
    inputs, labels = load_examples(default_model.path)
    model, policy = default_model.model, default_model.policy
    report = exit_report(model, all_exit_logits(model, policy, inputs), torch.tensor(labels), policy)
    assert report.n == 540
    assert report.exit_fraction[0] > 0.01, report.exit_fraction       # easy inputs leave at the first ramp
    assert sum(report.exit_fraction[2:]) > 0.05, report.exit_fraction  # hard ones go deep
    assert report.exit_fraction[-1] > 0, "some inputs must reach the head"
    assert report.head_accuracy > 0.95
    assert report.accuracy >= report.head_accuracy - 0.015
    assert report.mean_blocks < model.meta.num_blocks - 1
    recorded = read_manifest(default_model.path)["trained"]["test"]
    assert recorded["accuracy"] == pytest.approx(report.accuracy)


@pytest.mark.parametrize("name,threshold", [("entropy", 0.5), ("maxprob", 0.9), ("patience", 1)])
def test_split_pipeline_equals_reference(default_model, name, threshold):
    """Split by split with survivors of different batches merged, as the runtime
    does, against the per-sample forward with the same enabled ramps."""
    from e3.models.executor import reference_forward
    from e3.models.policies import make_policy
    from tests.models.test_executor import run_pipeline
    model = default_model.model
    inputs = [torch.tensor(x) for x in load_examples(default_model.path, 150)[0]]
    policy = make_policy(name, threshold)
    cuts = (0, 2)
    ref = [(a.label, a.exit_point) for a in reference_forward(model, policy, inputs, [0, 2])]
    got, _ = run_pipeline(model, policy, inputs, cuts, batch=16)
    # float32 convolutions may differ in the last bits between batch sizes; a
    # decision can then flip only for an input right at the threshold.
    differ = [i for i, (g, r) in enumerate(zip(got, ref)) if g != r]
    assert len(differ) <= 1, differ
    assert len({e for _, e in ref}) >= 2
