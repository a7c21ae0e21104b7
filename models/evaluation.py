"""How an EE model exits on labelled data: the table a user tunes a threshold from.

Everything is computed from one pass that records every exit point's logits
for every input (all ramps evaluated), so sweeping thresholds costs no more
model runs. The decisions replay the policy exactly as the executor does.

    report = describe_exits(model, policy, inputs, labels)   # one setting
    reports = sweep(model, all_exit_logits(model, policy, inputs), labels, "entropy", grid)
    print(format_table(reports)); chosen = pick_threshold(reports)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .base import EarlyExitModel
from .executor import init_state
from .policies import ExitPolicy, make_policy


@dataclass
class ExitReport:
    """Exit fractions and accuracies at one policy setting."""

    policy: str
    threshold: float
    accuracy: float                    # of the EE model at this setting
    head_accuracy: float               # of the full model (head only)
    exit_fraction: list[float]         # per exit point (ramps, then the head)
    exit_accuracy: list[float | None]  # accuracy of the inputs leaving there
    mean_blocks: float                 # blocks run per input on average
    n: int

    def to_json(self) -> dict:
        """Plain JSON values; fractions rounded to 6 places (n is at most a few thousand)."""
        def r(v):
            return round(v, 6) if isinstance(v, float) else v
        return {k: [r(x) for x in v] if isinstance(v, list) else r(v)
                for k, v in ((k, getattr(self, k)) for k in self.__dataclass_fields__)}


def all_exit_logits(model: EarlyExitModel, policy: ExitPolicy, inputs: Sequence, batch: int = 256) -> torch.Tensor:
    """[n, exit points, classes] logits of every ramp and the head."""
    meta, out = model.meta, []
    with torch.inference_mode():
        for i in range(0, len(inputs), batch):
            state, first, per = init_state(model, policy, inputs[i:i + batch]), 0, []
            for k, block in enumerate(meta.ramp_blocks):
                state = model.run(first, block, state)
                per.append(model.ramp(k, state).float().cpu())
                first = block + 1
            state = model.run(first, meta.num_blocks - 1, state)
            per.append(model.head(state).float().cpu())
            out.append(torch.stack(per, dim=1))
    return torch.cat(out)


def decide_exits(logits: torch.Tensor, policy: ExitPolicy) -> torch.Tensor:
    """The exit point of each input given all exit logits (every ramp enabled)."""
    n, points, _ = logits.shape
    from .state import BatchState
    state = BatchState({"_": torch.zeros(n)})
    if policy.state_fields():
        state = state.replace(**policy.init_fields(n))
    exit_at = torch.full((n,), points - 1, dtype=torch.int64)
    undecided = torch.ones(n, dtype=torch.bool)
    for k in range(points - 1):
        mask, updates = policy.decide(logits[:, k], state)
        if updates:
            state = state.replace(**updates)
        newly = mask & undecided
        exit_at[newly] = k
        undecided &= ~newly
    return exit_at


def exit_report(model: EarlyExitModel, logits: torch.Tensor, labels: torch.Tensor,
                policy: ExitPolicy) -> ExitReport:
    meta = model.meta
    exit_at = decide_exits(logits, policy)
    preds = logits[torch.arange(len(labels)), exit_at].argmax(-1)
    correct = preds == labels
    blocks = torch.tensor([meta.exit_block(e) + 1 for e in range(meta.head_exit + 1)], dtype=torch.float64)
    fractions, accs = [], []
    for e in range(meta.head_exit + 1):
        sel = exit_at == e
        fractions.append(float(sel.float().mean()))
        accs.append(float(correct[sel].float().mean()) if sel.any() else None)
    return ExitReport(policy.name, policy.threshold, float(correct.float().mean()),
                      float((logits[:, -1].argmax(-1) == labels).float().mean()), fractions, accs,
                      float(blocks[exit_at].mean()), len(labels))


def describe_exits(model: EarlyExitModel, policy: ExitPolicy, inputs: Sequence,
                   labels: Sequence[int] | torch.Tensor, batch: int = 256) -> ExitReport:
    """Per exit point: the fraction of `inputs` leaving there and their accuracy, under `policy`."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if len(labels) != len(inputs):
        raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
    return exit_report(model, all_exit_logits(model, policy, inputs, batch), labels, policy)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) on held-out data.

    A ramp trained on the backbone's own training data is mis-calibrated (here:
    under-confident, T < 1), and an entropy threshold then means something
    different at every ramp. One scalar per exit, found by a grid search over
    0.01..100 (deterministic, no optimiser to diverge), fixes that without
    changing any argmax.
    """
    grid = torch.logspace(-2, 2, 161, dtype=torch.float64)
    z, y = logits.detach().double(), labels.to(torch.int64)
    nll = torch.stack([torch.nn.functional.cross_entropy(z / t, y) for t in grid])
    return float(grid[int(nll.argmin())])


def sweep(model: EarlyExitModel, logits: torch.Tensor, labels: torch.Tensor, policy_name: str,
          thresholds: Sequence[float]) -> list[ExitReport]:
    return [exit_report(model, logits, labels, make_policy(policy_name, t)) for t in thresholds]


def pick_threshold(reports: Sequence[ExitReport], max_drop: float = 0.01) -> ExitReport:
    """The setting that runs fewest blocks while accuracy stays within `max_drop` of the
    head's; if none does, the most accurate one (never buy speed with accuracy)."""
    ok = [r for r in reports if r.accuracy >= r.head_accuracy - max_drop - 1e-12]
    if not ok:
        return max(reports, key=lambda r: (r.accuracy, -r.mean_blocks))
    return min(ok, key=lambda r: r.mean_blocks)


def format_table(reports: Sequence[ExitReport]) -> str:
    points = len(reports[0].exit_fraction)
    head = f"{'threshold':>9} {'accuracy':>8} {'blocks':>6}  " + " ".join(
        f"{'exit' + str(e) if e < points - 1 else 'head':>6}" for e in range(points))
    rows = [f"{r.threshold:>9.3f} {r.accuracy:>8.2%} {r.mean_blocks:>6.2f}  " + " ".join(
        f"{f:>6.1%}" for f in r.exit_fraction) for r in reports]
    return "\n".join([head, *rows])
