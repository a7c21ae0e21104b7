"""The ResNet family behind the EE interface: shapes, inputs, checkpoints, row independence.

Small untrained networks suffice here (these checks hold for any weights);
the trained default model is tested in test_digits.py.
"""
import json

import numpy as np
import pytest
import torch

from e3.models.base import InputKind
from e3.models.errors import CheckpointError, InvalidInputError
from e3.models.registry import MANIFEST, load_model, read_manifest
from e3.models.resnet import WEIGHTS, ResNetArch, ResNetEE, ResNetNet, load, save

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ResNetArch(input_scale=16.0, stem_channels=8, blocks=((8, 1), (16, 2), (16, 1)), groups=4)


def small_model(arch=SMALL, seed=0):
    torch.manual_seed(seed)
    return ResNetEE(ResNetNet(arch), "small")


def digits_like(n, seed=0):
    """Inputs on the digits' scale (pixel values 0..16), flat."""
    return list(torch.randint(0, 17, (n, 64), generator=torch.Generator().manual_seed(seed)).float())


def all_exits(model, inputs):
    """Logits of every ramp and the head, running block by block."""
    with torch.inference_mode():
        state, out = model.encode(inputs), []
        for b in range(model.meta.num_blocks):
            state = model.run(b, b, state)
            k = model.meta.ramp_at(b)
            if k is not None:
                out.append(model.ramp(k, state))
        return out + [model.head(state)]


def test_meta_describes_what_the_blocks_produce():
    model = small_model()
    meta = model.meta
    assert (meta.family, meta.num_blocks, meta.ramp_blocks) == ("resnet", 3, (0, 1))
    assert meta.input_kind is InputKind.TENSOR and meta.input_shape == (1, 8, 8)
    assert meta.labels == tuple(str(i) for i in range(10))
    state = model.encode(digits_like(5))
    state.check(meta.input_spec, "input")
    for b, spec in enumerate(meta.boundary_specs):
        state = model.run(b, b, state)
        state.check(spec, f"after block {b}")
        assert spec.names == ("hidden",) and spec.fields[0].dtype == torch.float32
    assert [meta.boundary_bytes(b) for b in range(3)] == [8 * 8 * 8 * 4, 16 * 4 * 4 * 4, 16 * 4 * 4 * 4]
    assert [tuple(t.shape) for t in all_exits(model, digits_like(5))] == [(5, 10)] * 3


def test_fused_runs_equal_block_by_block():
    model = small_model()
    x = digits_like(4)
    with torch.inference_mode():
        fused = model.run(0, 2, model.encode(x))["hidden"]
        stepped = model.run(2, 2, model.run(1, 1, model.run(0, 0, model.encode(x))))["hidden"]
    torch.testing.assert_close(fused, stepped, rtol=0, atol=0)


def test_arch_from_stages_and_default_ramps():
    arch = ResNetArch.from_stages([(16, 2, 1), (32, 2, 2)], stem_channels=16)
    assert arch.blocks == ((16, 1), (16, 1), (32, 2), (32, 1))
    assert arch.ramp_blocks == (0, 1, 2)                  # after every block but the last
    assert arch.shapes() == [(16, 8, 8), (16, 8, 8), (32, 4, 4), (32, 4, 4)]
    assert ResNetArch.from_json(json.loads(json.dumps(arch.to_json()))) == arch


@pytest.mark.parametrize("fields,message", [
    ({"blocks": ((12, 1),)}, "width 12 is not divisible by groups=8"),
    ({"blocks": ((32, 3), (32, 1))}, r"block 0 must be \(channels >= 1, stride 1 or 2\), got \(32, 3\)"),
    ({"ramp_blocks": (0, 4)}, r"ramp_blocks must increase strictly within 0..3, got \(0, 4\)"),
    ({"ramp_blocks": (1, 0)}, "ramp_blocks must increase strictly"),
    ({"blocks": ()}, "blocks is empty"),
    ({"input_scale": 0}, "input_scale must be positive, got 0"),
    ({"num_classes": 0}, "num_classes must be at least 1, got 0"),
])
def test_bad_arch_is_refused_naming_the_value(fields, message):
    with pytest.raises(ValueError, match=message):
        ResNetArch(**fields)


def test_every_input_form_gives_the_same_state():
    model = small_model()
    x = digits_like(1)[0]
    forms = [x, x.tolist(), x.numpy(), x.view(8, 8), x.view(8, 8).tolist(), x.view(1, 8, 8),
             x.double(), x.to(torch.int64).numpy()]
    states = [model.encode([f])["hidden"] for f in forms]
    for s in states:
        assert s.shape == (1, 1, 8, 8) and s.dtype == torch.float32
        torch.testing.assert_close(s, states[0], rtol=0, atol=0)
    batch = torch.stack(digits_like(3))                      # a [3, 64] tensor is 3 samples
    assert model.encode(batch).rows == 3 and model.encode(batch.numpy()).rows == 3


@pytest.mark.parametrize("bad,message", [
    ([[0.0] * 63], r"input 0 has shape \(63,\); expected \(1, 8, 8\) or 64 values"),
    ([[0.0] * 64, [0.0] * 65], r"input 1 has shape \(65,\); expected \(1, 8, 8\) or 64 values"),
    ([[[0.0] * 32] * 2], r"input 0 has shape \(2, 32\); expected \(1, 8, 8\) or 64 values"),
    ([np.zeros((2, 8, 8))], r"input 0 has shape \(2, 8, 8\); expected \(1, 8, 8\)"),
    ([[0.0] * 64, "x" * 64], r"input 1 is not numeric: 'xxxx"),
    ([[0.0] * 64, [0.0] * 64, [None] * 64], r"input 2 is not numeric: \[None"),
    ([[0.0] * 64, [[1.0, 2.0], [3.0]]], "input 1 is not numeric"),
    ([[0.0] * 63 + [float("nan")]], r"input 0 holds NaN or infinite values \(value 63 is nan\)"),
    ([[0.0] * 64, [float("inf")] * 64], r"input 1 holds NaN or infinite values \(value 0 is inf\)"),
    ([], "no inputs given"),
    (5, "inputs must be a sequence of samples, got int"),
])
def test_bad_inputs_name_the_sample_and_the_shapes(bad, message):
    with pytest.raises(InvalidInputError, match=message):
        small_model().encode(bad)


def test_a_long_bad_input_gives_a_short_message():
    with pytest.raises(InvalidInputError) as info:
        small_model().encode([["a"] * 100_000])
    assert len(str(info.value)) < 300


def test_rows_are_independent():
    """A row's logits alone and inside a batch agree (GroupNorm is per sample; no BatchNorm)."""
    model = small_model(seed=3)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.net.modules())
    xs = digits_like(12, seed=4)
    together = all_exits(model, xs)
    alone = [all_exits(model, [x]) for x in xs]
    for e, batch_logits in enumerate(together):
        torch.testing.assert_close(batch_logits, torch.cat([a[e] for a in alone]), rtol=1e-4, atol=1e-5)
    # Dropping rows or reordering them (what the rebatcher does) changes nothing either.
    with torch.inference_mode():
        h = model.run(0, 0, model.encode(xs))
        picked = model.run(1, 2, h.select(torch.tensor([7, 2, 5])))["hidden"]
        full = model.run(1, 2, h)["hidden"][[7, 2, 5]]
    torch.testing.assert_close(picked, full, rtol=1e-4, atol=1e-5)


def test_save_and_load_give_identical_logits(tmp_path):
    model = small_model(seed=1)
    save(model, tmp_path, {"policy": {"name": "maxprob", "threshold": 0.9}, "note": "kept"})
    manifest = read_manifest(tmp_path)
    assert manifest["family"] == "resnet" and manifest["note"] == "kept"
    assert manifest["arch"]["blocks"] == [[8, 1], [16, 2], [16, 1]]
    loaded = load_model(tmp_path)
    assert loaded.model.meta == model.meta and loaded.policy.name == "maxprob"
    xs = digits_like(6)
    for a, b in zip(all_exits(model, xs), all_exits(loaded.model, xs)):
        assert torch.equal(a, b)


def test_checkpoint_files_are_safetensors_only(tmp_path):
    save(small_model(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, WEIGHTS]
    assert (tmp_path / WEIGHTS).read_bytes()[8:9] == b"{"          # safetensors: length, then JSON header


def test_missing_or_mismatched_weights_name_the_file_and_tensor(tmp_path):
    save(small_model(), tmp_path)
    manifest = read_manifest(tmp_path)
    weights = tmp_path / WEIGHTS
    data = weights.read_bytes()

    weights.unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        load(tmp_path, manifest)

    weights.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable"):
        load(tmp_path, manifest)

    weights.write_bytes(data)
    fewer_classes = {**manifest, "arch": {**manifest["arch"], "num_classes": 5}}
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'ramps\.0\.fc\.weight' has shape "
                                              r"\(10, 8\), the manifest's arch needs \(5, 8\)"):
        load(tmp_path, fewer_classes)

    deeper = {**manifest, "arch": {**manifest["arch"], "blocks": [[8, 1], [16, 2], [16, 1], [16, 1]]}}
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensor 'blocks\.3\.conv1\.weight'"):
        load(tmp_path, deeper)

    fewer_ramps = {**manifest, "arch": {**manifest["arch"], "ramp_blocks": [1]}}
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'ramps\.1\.fc\.bias'"):
        load(tmp_path, fewer_ramps)

    with pytest.raises(CheckpointError, match=r"bad 'arch' \(resnet arch: width 8 is not divisible by groups=3\)"):
        load(tmp_path, {**manifest, "arch": {**manifest["arch"], "groups": 3}})
    with pytest.raises(CheckpointError, match="'arch' must be an object, got None"):
        load(tmp_path, {"family": "resnet"})
    with pytest.raises(CheckpointError, match="bad 'arch'.*unexpected keyword argument 'depth'"):
        load(tmp_path, {**manifest, "arch": {**manifest["arch"], "depth": 50}})
