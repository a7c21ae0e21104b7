"""Per-exit confidence estimators: will this exit's next token equal the full model's?

A tiny MLP per exit reads the normed hidden state (the LM head's own input) and
outputs the probability that the exit's argmax token equals the full-depth
argmax. It is trained on real text, teacher-forced: for every position of
every training text the model runs full depth once, and each exit's LM-head
argmax is compared with the final one. The threshold of each exit is the
lowest that keeps agreement among the tokens it lets leave at or above
`target` on held-out data, searched over every held-out probability (an exit
that cannot reach it is switched off).
Deciding costs a 640x64 product per row; only leaving rows pay the LM head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

OFF = 2.0          # a threshold no probability reaches: the exit never fires


class ExitEstimators(nn.Module):
    """One small MLP per exit on the normed hidden state; `rule` turns them into exit decisions."""

    def __init__(self, hidden: int, n_exits: int, width: int = 64):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, 1)) for _ in range(n_exits))
        self.register_buffer("thresholds", torch.full((n_exits,), OFF))

    def forward(self, e: int, normed: torch.Tensor) -> torch.Tensor:
        """P(exit e agrees with full depth) for rows `normed` [R, H]."""
        return torch.sigmoid(self.heads[e](normed.to(self.heads[e][0].weight.dtype))[:, 0])

    @torch.inference_mode()
    def rule(self, e: int, normed: torch.Tensor) -> torch.Tensor:
        """Which rows leave at exit e (an ExitRule)."""
        return self(e, normed) >= self.thresholds[e]


@dataclass
class ExitData:
    """Teacher-forced samples for one exit: normed states [N, H] and agreement labels [N]."""

    features: torch.Tensor
    agree: torch.Tensor


@torch.inference_mode()
def collect(model, texts: list[list[int]], chunk: int = 256, starts: list[int] | None = None) -> list[ExitData]:
    """For each exit of `model` (an EarlyExitCausalLM), samples from every position of `texts`
    from `starts[i]` on (default 1: all but the BOS position, whose state is unlike any
    generated token's)."""
    fam, L = model.family, model.num_layers
    states = {layer: [] for layer in (*model.exits, L)}
    for i, ids in enumerate(texts):
        start = 1 if starts is None else starts[i]
        for layer, h in model.trace(ids, model.exits).items():
            states[layer].append(h[start:])
    normed = {layer: fam.backbone.norm(torch.cat(hs)) for layer, hs in states.items()}
    final = _argmax_head(fam, normed[L], chunk)
    return [ExitData(normed[e], (_argmax_head(fam, normed[e], chunk) == final).float()) for e in model.exits]


def _argmax_head(fam, normed: torch.Tensor, chunk: int) -> torch.Tensor:
    """argmax of the LM head on already-normed states, `chunk` rows at a time (262k-wide logits)."""
    head = fam.lm.lm_head
    return torch.cat([head(normed[i:i + chunk]).argmax(-1) for i in range(0, len(normed), chunk)])


def train(est: ExitEstimators, data: list[ExitData], steps: int = 300, lr: float = 3e-3,
          seed: int = 0) -> None:
    """Fit each exit's head to its agreement labels (full batch, Adam, BCE)."""
    torch.manual_seed(seed)
    for head, d in zip(est.heads, data):
        opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-4)
        x, y = d.features.clone(), d.agree.clone()
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(head(x)[:, 0], y)
            loss.backward()
            opt.step()


@torch.inference_mode()
def calibrate(est: ExitEstimators, held: list[ExitData], target: float | list[float],
              min_count: int = 20) -> list[dict]:
    """Set each exit's threshold on held-out data (`target`: one agreement, or one per exit);
    its figures (share leaving, their agreement, and the best agreement any threshold reaches)."""
    targets = target if isinstance(target, list) else [target] * len(held)
    return [_calibrate_one(est, e, d, t, min_count) for e, (d, t) in enumerate(zip(held, targets))]


def _calibrate_one(est: ExitEstimators, e: int, d: ExitData, target: float, min_count: int) -> dict:
    """The loosest threshold whose leaving rows (p >= threshold, at least `min_count` of them) agree
    with full depth at `target` or better: every distinct held-out probability is a candidate, so a
    small confident region is found wherever it lies (OFF when there is none)."""
    p = est(e, d.features)
    order = torch.argsort(p, descending=True)
    ps, agree = p[order], d.agree[order]
    n = torch.arange(1, len(p) + 1)
    cum = agree.cumsum(0) / n                       # agreement of the k most confident rows
    cut = torch.ones(len(p), dtype=torch.bool)       # k rows leave exactly at threshold ps[k-1]
    cut[:-1] = ps[1:] < ps[:-1]
    enough = cut & (n >= min_count)
    ok = enough & (cum >= target)
    best = int(cum[enough].argmax()) if bool(enough.any()) else None
    best_k = int(n[enough][best]) if best is not None else 0
    report = {"target": target, "base_agreement": float(d.agree.mean()), "samples": len(p),
              "best_agreement": float(cum[best_k - 1]) if best_k else None,
              "best_share": best_k / len(p)}
    if not bool(ok.any()):
        est.thresholds[e] = OFF
        return report | {"threshold": OFF, "share_leaving": 0.0, "agreement_of_leaving": None}
    k = int(n[ok][-1])
    est.thresholds[e] = float(ps[k - 1])
    return report | {"threshold": float(ps[k - 1]), "share_leaving": k / len(p),
                     "agreement_of_leaving": float(cum[k - 1])}
