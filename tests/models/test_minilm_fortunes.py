"""The built-in default model's corpus and split (models/minilm_fortunes.py)."""
import pytest

from e3.models import minilm_fortunes as mf
from e3.models.registry import MANIFEST, read_manifest, resolve


def test_the_shipped_corpus_is_six_topics_of_short_real_texts():
    rows = mf.texts()
    assert len(rows) == 575
    assert {r["label"] for r in rows} == {"computers", "food", "love", "politics", "science", "sports"}
    assert all(3 <= len(r["text"].split()) <= 20 for r in rows)


def test_the_held_out_split_is_a_fifth_of_every_topic_and_never_trained_on():
    held, train = mf.split(mf.texts())
    assert {r["text"] for r in held}.isdisjoint(r["text"] for r in train)
    assert len(held) + len(train) == 575
    for topic in {r["label"] for r in held}:
        n = sum(r["label"] == topic for r in held + train)
        assert sum(r["label"] == topic for r in held) == round(0.2 * n)
    assert mf.split(mf.texts()) == (held, train), "the same on every machine"


@pytest.mark.slow
def test_default_resolves_to_the_trained_minilm_with_its_held_out_texts(e3_cache):
    path = resolve("default")
    assert path == mf.model_dir() and (path / MANIFEST).is_file()
    manifest = read_manifest(path)
    assert manifest["family"] == "bert" and manifest["name"] == "minilm-fortunes"
    assert len(mf.load_heldout(path)) == 115
    exits = manifest["trained"]["validation"]["exit_fraction"]
    assert exits[0] > 0.1 and exits[-1] < 0.9, "real texts leave at the ramps, not only at the head"
    assert resolve("minilm-fortunes") == path
