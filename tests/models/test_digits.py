"""The built-in default model: real digits, real weights, real exits.

The model is trained once per test session (the session fixture
`default_model_dir`, about 15-20 s on 2 cores) into a per-run cache.
"""
import threading
import time

import pytest
import torch

from e3.models import digits
from e3.models.errors import CheckpointError
from e3.models.evaluation import all_exit_logits, describe_exits, pick_threshold, sweep
from e3.models.executor import reference_forward
from e3.models.policies import make_policy
from e3.models.registry import MANIFEST, read_manifest, resolve

from tests.models.test_executor import run_pipeline


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def testset(default_model_dir):
    return digits.load_testset(default_model_dir)


def test_trained_once_then_cached(default_model_dir):
    assert default_model_dir == digits.default_model_dir()
    assert default_model_dir.name == f"digits-resnet-{digits.VERSION}"
    start = time.perf_counter()
    assert resolve("digits") == default_model_dir
    assert time.perf_counter() - start < 0.5
    assert not list(default_model_dir.parent.glob(f".{default_model_dir.name}-*")), "temp dir left behind"


def test_manifest_records_what_was_trained_and_measured(default_model_dir, default_model):
    m = read_manifest(default_model_dir)
    assert m["family"] == "resnet" and m["name"] == "digits-resnet"
    assert m["labels"] == [str(i) for i in range(10)]
    assert m["arch"]["blocks"] == [[32, 1], [32, 1], [64, 2], [64, 1], [64, 1]]
    assert m["policy"]["name"] == "entropy" and 0 < m["policy"]["threshold"] < 1
    trained = m["trained"]
    assert trained["seed"] == digits.SEED and trained["torch"] == torch.__version__
    assert 0 < trained["train_seconds"] < 120
    assert trained["rows"] == {"fit": 942, "validation": 315, "test": 540}
    assert len(trained["temperatures"]) == 5
    for split in ("validation", "test"):
        report = trained[split]
        assert report["threshold"] == m["policy"]["threshold"]
        assert len(report["exit_fraction"]) == len(report["exit_accuracy"]) == 5
        assert sum(report["exit_fraction"]) == pytest.approx(1.0)
    assert default_model.policy.describe() == {"policy": "entropy", "threshold": m["policy"]["threshold"]}


def test_testset_is_the_held_out_split(default_model_dir, testset):
    inputs, labels = testset
    assert inputs.shape == (540, 64) and inputs.dtype == torch.float32
    assert labels.shape == (540,) and labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=10).min() >= 50                  # stratified: 52-55 per class
    assert 0 <= inputs.min() and inputs.max() <= 16                          # raw digit pixels
    data = digits.load_digits_data()
    assert torch.equal(data.x_test, inputs) and torch.equal(data.y_test, labels)
    seen = {tuple(x.tolist()) for x in torch.cat([data.x_fit, data.x_val])}
    assert sum(tuple(x.tolist()) in seen for x in inputs) < 5               # (the digits hold a few duplicates)


def test_missing_testset_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"testset\.safetensors is missing"):
        digits.load_testset(tmp_path)


def test_real_exits_on_held_out_digits(default_model_dir, default_model, testset):
    """At the recommended threshold: easy digits leave at the first ramp, some go through
    the middle ramps, some need the head, and accuracy stays with the head's."""
    inputs, labels = testset
    report = describe_exits(default_model.model, default_model.policy, list(inputs), labels)
    fractions = report.exit_fraction
    assert report.n == 540
    assert fractions[0] > 0.05, fractions
    assert sum(fractions[1:-1]) > 0.2, fractions
    assert fractions[-1] > 0.01, fractions
    assert report.head_accuracy > 0.95
    assert report.accuracy > 0.90
    assert report.accuracy >= report.head_accuracy - 0.015
    assert report.mean_blocks < 0.7 * default_model.model.meta.num_blocks
    recorded = read_manifest(default_model_dir)["trained"]["test"]
    assert recorded["accuracy"] == pytest.approx(report.accuracy, abs=1e-6)
    assert recorded["exit_fraction"] == pytest.approx(fractions, abs=1e-6)


def test_threshold_comes_from_validation_data_alone(default_model_dir, default_model):
    """Re-derive the recommended threshold from the validation split: the test split
    played no part in choosing it."""
    model = default_model.model
    data = digits.load_digits_data()
    logits = all_exit_logits(model, default_model.policy, list(data.x_val))
    chosen = pick_threshold(sweep(model, logits, data.y_val, "entropy", digits.THRESHOLDS), max_drop=0.0)
    assert chosen.threshold == read_manifest(default_model_dir)["policy"]["threshold"]


def test_rows_are_independent_on_real_weights(default_model, testset):
    model = default_model.model
    xs = list(testset[0][:16])
    last = model.meta.num_blocks - 1
    with torch.inference_mode():
        together = model.head(model.run(0, last, model.encode(xs)))
        alone = torch.cat([model.head(model.run(0, last, model.encode([x]))) for x in xs])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,threshold", [("entropy", None), ("maxprob", 0.95), ("patience", 1)])
def test_split_pipeline_equals_reference(default_model, testset, name, threshold):
    """Split by split, survivors of different batches merged (as the runtime does),
    against the per-sample forward with the same enabled ramps."""
    model = default_model.model
    policy = make_policy(name, default_model.policy.threshold if threshold is None else threshold)
    inputs = list(testset[0][:100])
    cuts = (0, 2)
    ref = [(a.label, a.exit_point) for a in reference_forward(model, policy, inputs, [0, 2])]
    got, _ = run_pipeline(model, policy, inputs, cuts, batch=16)
    # float32 convolutions may differ in the last bits between batch sizes; a
    # decision can then flip only for an input right at the threshold.
    differ = [i for i, (g, r) in enumerate(zip(got, ref)) if g != r]
    assert len(differ) <= 1, differ
    assert len({e for _, e in ref}) >= 2


def test_concurrent_callers_train_once(tmp_path, monkeypatch):
    """Several callers at once: one trains (under the lock, into a temp dir), all get
    the same finished directory; leftovers of a killed trainer are cleared."""
    monkeypatch.setenv("E3_CACHE", str(tmp_path))
    final = digits.default_model_dir()
    (final.parent / f".{final.name}-killed").mkdir(parents=True)        # a killed trainer's temp dir
    final.mkdir()                                                        # a model dir without manifest
    calls = []

    def fake_train(out):
        calls.append(out)
        time.sleep(0.3)                  # long enough for the other callers to queue on the lock
        (out / MANIFEST).write_text('{"family": "resnet"}')
        (out / "model.safetensors").write_bytes(b"")
        return out

    monkeypatch.setattr(digits, "train_default", fake_train)
    results = []
    threads = [threading.Thread(target=lambda: results.append(digits.ensure_default_model())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [final] * 3 and len(calls) == 1
    assert calls[0].parent == final.parent and calls[0].name.startswith(f".{final.name}-")
    assert sorted(p.name for p in final.parent.iterdir()) == [f".{final.name}.lock", final.name]
    assert (final / MANIFEST).stat().st_mode & 0o777 == 0o644


def test_a_failed_training_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("E3_CACHE", str(tmp_path))

    def broken(out):
        (out / "partial").write_text("x")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(digits, "train_default", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        digits.ensure_default_model()
    final = digits.default_model_dir()
    assert [p.name for p in final.parent.iterdir()] == [f".{final.name}.lock"]
