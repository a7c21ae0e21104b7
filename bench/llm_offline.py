"""What the LLM goodput benchmark measures once, offline, with the model in this process.

    python3 -m bench.llm_offline --tokens 16 --batch 8 > offline.json

- Prompts: the first half (by words) of each held-out fortunes text
  (bench/llm_decode.py's `prompts`: texts the exit estimators never trained on).
- Reference: each prompt's greedy tokens at full depth (what "agreement" compares with).
- Exits: each prompt's greedy tokens through the EE model as served (exits on, no
  splits), with each token's exit layer. A prompt's easiness is the mean number
  of decoder layers its decode tokens ran: the benchmark's easy and hard mixes
  draw from the prompts below and above the median.
- Profile: one full-depth decode step and the final norm + LM head alone, at each
  batch size (bench/llm_decode.py's `profile`), for the bound.

Every figure is measured here on this machine; nothing is assumed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from e3.models.causal_lm import gemma3_270m

from .llm_decode import decode_batch, profile, prompts


def rows(model, ps: list[list[int]], tokens: int, batch: int, use_exits: bool):
    """(tokens, exit layers) per prompt, `batch` prompts decoded together."""
    toks, layers = [], []
    for i in range(0, len(ps), batch):
        t, l, _ = decode_batch(model, ps[i:i + batch], tokens, use_exits)
        toks += t
        layers += l
    return toks, layers


def measure(tokens: int, batch: int, batches: list[int], n_prompts: int, kv_mode: str) -> dict:
    t0 = time.perf_counter()
    tok, model = gemma3_270m.load(kv_mode)
    ps = prompts(tok, n_prompts)
    full, _ = rows(model, ps, tokens, batch, use_exits=False)
    ee, layers = rows(model, ps, tokens, batch, use_exits=True)
    manifest = json.loads((gemma3_270m.estimators_dir() / "e3-model.json").read_text())
    return {"prompts": [tok.decode(p, skip_special_tokens=True) for p in ps],
            "prompt_tokens": [len(p) for p in ps], "reference": full, "ee_tokens": ee, "ee_layers": layers,
            "num_layers": model.num_layers, "exits": list(model.exits), "kv_mode": kv_mode,
            "estimators": manifest, "profile": [profile(model, b) for b in batches],
            "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench.llm_offline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--kv-mode", default="copy", choices=["copy", "exact"])
    args = p.parse_args(argv)
    if args.tokens < 2 or args.batch < 1:
        print("bench.llm_offline: error: --tokens must be at least 2 and --batch positive", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",")]
    print(json.dumps(measure(args.tokens, args.batch, batches, args.prompts, args.kv_mode)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
